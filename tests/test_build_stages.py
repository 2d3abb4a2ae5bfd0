"""Build stages of docs/method.md Part 1 on constructed data where the answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED, needs_shared
from reme.build.filtering import ambiguous_roots, clip_score_filter, group_median_filter, knee_index, relabel_dropped
from reme.build.nounphrases import NounPhrase, extract_noun_phrases, load_spacy, substitute_root
from reme.build.pairing import pair_labels_to_segments
from reme.build.synonyms import synonym_pairs
from reme.encoders.text import TEMPLATES, embed_labels


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def nlp():
    return load_spacy()


def test_pairing_picks_best_segment_per_label():
    rng = np.random.default_rng(1)
    S = _unit(rng.normal(size=(6, 8)))
    L = _unit(S[[4, 1, 4]] + 0.05 * rng.normal(size=(3, 8)))
    best, score = pair_labels_to_segments(S, L)
    assert best.tolist() == [4, 1, 4]
    assert np.all(score > 0.9)
    with pytest.raises(ValueError):
        pair_labels_to_segments(S, L[:, :4])


def test_group_filter_drops_planted_outliers():
    rng = np.random.default_rng(0)
    d = 32
    cat_c, dog_c = _unit(rng.normal(size=d)), _unit(rng.normal(size=d))
    cats = _unit(cat_c + 0.2 * rng.normal(size=(7, d)))
    dogs = _unit(dog_c + 0.2 * rng.normal(size=(10, d)))
    outliers = _unit(rng.normal(size=(3, d)))           # mislabeled "dog" segments
    S = np.concatenate([cats, dogs, outliers]).astype(np.float32)
    roots = ["cat"] * 7 + ["dog"] * 13
    keep = group_median_filter(S, np.arange(20), roots, drop_rate=0.30)
    assert not keep[17:].any(), "the three outliers in the dog group must be dropped"
    assert keep[:17].sum() == 17 - 2 - 0  # floor(0.3*7)=2 cats dropped, 3 dogs (the outliers)
    assert keep[7:17].all()
    # adaptive: the consistent cat group loses less than the polluted dog group (by rate)
    keep_a = group_median_filter(S, np.arange(20), roots, adaptive=True, max_drop_rate=0.5)
    assert not keep_a[17:].any()
    assert (~keep_a[:7]).sum() / 7 < (~keep_a[7:]).sum() / 13


def test_knee_filter_removes_oversized_background_group():
    sizes = {"background": 900, "scene": 700, "image": 650}
    sizes.update({f"thing{i}": 60 - i for i in range(30)})
    removed = ambiguous_roots(sizes, max_removed_share=1.0)       # they hold 62 % of the pairs
    assert set(removed) == {"background", "scene", "image"}
    assert ambiguous_roots(sizes) == ["background", "scene"]      # default cap: at most 50 %
    assert ambiguous_roots({"a": 100, "b": 1}) == []  # too few groups to find a knee
    assert knee_index(np.array([5, 5, 5, 5])) == 0


def test_synonyms_found_between_bike_and_bicycle(minilm):
    roots = ["bike", "bicycle", "sky", "dog", "kitchen", "car", "puppy", "tree"]
    E = embed_labels(minilm, roots, ("{}",))
    pairs = synonym_pairs(roots, E, k_sim=2)
    top = {frozenset(p[:2]) for p in pairs}
    assert frozenset({"bike", "bicycle"}) in top
    assert pairs[0][2] >= pairs[1][2]
    assert len(synonym_pairs(roots, E, k_sim=100)) == len(roots) * (len(roots) - 1) // 2


def test_template_ensembling_is_mean_then_normalised(minilm):
    E = embed_labels(minilm, ["cat", "striped rug"])
    raw = minilm.encode([t.format("cat") for t in TEMPLATES]).mean(0)
    np.testing.assert_allclose(E[0], raw / np.linalg.norm(raw), atol=1e-5)
    assert np.allclose(np.linalg.norm(E, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError):
        embed_labels(minilm, ["cat"], ("no placeholder",))


def test_noun_phrases_keep_modifiers_and_compound_roots(nlp):
    (ps,) = extract_noun_phrases(["A stuffed teddy bear sits next to a red stop sign near a cute white rabbit."], nlp)
    by_text = {p.text: p for p in ps}
    assert by_text["a stuffed teddy bear"].root == "teddy bear"
    assert by_text["a red stop sign"].root == "stop sign"
    assert by_text["a cute white rabbit"].root == "rabbit"
    (bare,) = extract_noun_phrases(["A stuffed teddy bear"], nlp, keep_compounds=False)
    assert bare[0].root == "bear"
    assert substitute_root(NounPhrase("a small kitten", "kitten", "kitten"), "cat").text == "a small cat"


@needs_shared
def test_noun_phrases_on_real_coco_captions(nlp):
    rows = [json.loads(x) for x in (SHARED / "captions" / "coco_captions.jsonl").read_text().splitlines()[:20]]
    caps = [c for r in rows for c in r["captions"]]
    out = extract_noun_phrases(caps, nlp)
    assert len(out) == len(caps)
    roots = {p.root for ps in out for p in ps}
    assert {"man", "kitchen", "teddy bear", "bathroom"} <= roots
    for cap, ps in zip(caps, out):
        norm = " ".join(cap.lower().split())
        assert len({p.text for p in ps}) == len(ps)                       # no duplicate within a caption
        for p in ps:
            assert p.text == " ".join(p.text.split()) and p.text in norm   # a lower-cased span of its caption
            assert p.text.endswith(p.head) or f"{p.head} " in p.text      # the head is a word run of the phrase
            # the root is the head with its last word lemmatised ("two men" -> "man")
            assert p.root.split()[:-1] == p.head.split()[:-1] and len(p.root.split()) == len(p.head.split())
    pairs = {(p.text, p.root, p.head) for ps in out for p in ps}
    assert ("two men", "man", "men") in pairs and ("chefs", "chef", "chefs") in pairs
    assert not any(p.root in {"it", "they", "top", "lot"} for ps in out for p in ps)


def test_clip_score_baselines_global_and_per_group():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.25, 0.5, 0.4])
    roots = ["a"] * 5 + ["b"] * 5
    keep_g = clip_score_filter(scores, drop_rate=0.3)
    assert sorted(np.flatnonzero(~keep_g)) == [1, 3, 7]                 # three lowest overall
    keep_r = clip_score_filter(scores, roots, drop_rate=0.3)
    assert sorted(np.flatnonzero(~keep_r)) == [1, 7]                     # lowest of each group (floor(1.5)=1)


def test_relabel_moves_mislabelled_segment_to_the_right_group():
    rng = np.random.default_rng(0)
    ca, cb = _unit(rng.normal(size=(2, 16)))
    S = _unit(np.concatenate([ca + 0.1 * rng.normal(size=(5, 16)), cb + 0.1 * rng.normal(size=(5, 16)),
                              _unit(rng.normal(size=(1, 16)))]))
    S[4] = _unit(cb + 0.1 * rng.normal(size=16))     # a "cat" segment that looks like the dogs
    roots = ["cat"] * 5 + ["dog"] * 5 + ["cat"]
    keep = np.ones(11, bool)
    keep[[4, 10]] = False
    new, sim = relabel_dropped(S, np.arange(11), roots, keep, min_similarity=0.6)
    assert new[4] == 1 and sim[4] > 0.8                 # relabelled to "dog" (sorted kept roots: cat, dog)
    assert new[10] == -1 and sim[10] < 0.6              # random segment stays dropped
    assert (new[keep] == -1).all() and np.isnan(sim[keep]).all()


def test_head_stop_list_is_matched_on_the_root_used(nlp):
    """ "tank top" is a garment, "the top" is a position: the stop-list sees the root with its
    compounds (issue 13), and is a parameter."""
    from reme.build.nounphrases import NON_OBJECT_ROOTS

    cap = ["A woman in a black tank top holds a cup on the top of a table."]
    (ps,) = extract_noun_phrases(cap, nlp)
    assert {p.root for p in ps} == {"woman", "tank top", "cup", "table"} and "top" in NON_OBJECT_ROOTS
    (bare,) = extract_noun_phrases(cap, nlp, keep_compounds=False)          # root "top": stopped
    assert "top" not in {p.root for p in bare} and "tank" not in {p.root for p in bare}
    (every,) = extract_noun_phrases(cap, nlp, stop_roots=())
    assert {"top", "tank top"} <= {p.root for p in every}
    (custom,) = extract_noun_phrases(cap, nlp, stop_roots={"cup"})
    assert {p.root for p in custom} == {"woman", "tank top", "top", "table"}


def test_stop_roots_reach_the_caption_shards():
    """CaptionBuildParams.stop_roots travels to the shard workers' StageSettings (step 3)."""
    from reme.build.pipeline import CaptionBuildParams
    from reme.build.nounphrases import NON_OBJECT_ROOTS
    from reme.build._shard_stages import StageSettings

    assert set(CaptionBuildParams().stop_roots) == set(NON_OBJECT_ROOTS)
    st = StageSettings(mode="caption", stop_roots=("top", "image"))
    back = StageSettings.from_dict(st.to_dict())
    assert back.stop_roots == ("image", "top") and back.to_dict() == st.to_dict()
    assert StageSettings.from_dict({k: v for k, v in st.to_dict().items() if k != "stop_roots"}).stop_roots \
        == tuple(sorted(NON_OBJECT_ROOTS))   # shard settings written before the option existed
