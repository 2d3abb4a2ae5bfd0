"""Segmenter options from the related systems (issue 7): proposals, GFA smoothing, "others",
free-form queries and synonym merging; on the embedded reference set and real photos."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from conftest import REPO, photo
from reme.inference.segmenter import Segmenter

REF = REPO / "reference_sets" / "default"


@pytest.fixture(scope="module")
def image():
    return photo("coffee")[::2, ::2].copy()


def test_cluster_proposals(image):
    seg = Segmenter(REF, device="cpu", proposals="cluster", n_clusters=5)
    res = seg.predict(image, ["cup", "table", "person"])
    k = res.segment_scores.shape[0]
    assert res.label_map.shape == image.shape[:2] and 5 <= k < 200
    assert set(np.unique(res.segment_ids)) == set(range(k))


def test_sam_proposals(image, tiny_sam):
    seg = Segmenter(REF, device="cpu", proposals=f"sam:{tiny_sam}")
    sam = seg.proposer.sam
    sam.points_per_side, sam.pred_iou_thresh, sam.stability_score_thresh = 4, 0.0, 0.0
    res = seg.predict(image, ["cup", "table"])
    assert res.label_map.shape == image.shape[:2] and res.segment_ids.max() < res.segment_scores.shape[0]


def test_others_threshold(image):
    names = ["cup", "table", "sky"]
    everything = Segmenter(REF, device="cpu", others_threshold=1.01, unlabelled=False).predict(image, names)
    assert everything.classes == names + ["others"] and (everything.label_map == 3).all()
    none = Segmenter(REF, device="cpu", others_threshold=0.0).predict(image, names)
    plain = Segmenter(REF, device="cpu").predict(image, names)
    assert np.array_equal(none.label_map, plain.label_map)
    with pytest.raises(ValueError, match="reserved"):
        Segmenter(REF, device="cpu", others_threshold=0.5).predict(image, ["others", "cup"])


def _isolated(res) -> int:
    """Segments whose label (argmax of their P_seg row) differs from that of every adjacent segment."""
    ids, lab = res.segment_ids, res.segment_scores.argmax(1)
    pairs = np.concatenate([np.stack([ids[:, :-1].ravel(), ids[:, 1:].ravel()], 1),
                            np.stack([ids[:-1].ravel(), ids[1:].ravel()], 1)])
    pairs = np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)
    same = np.zeros(len(lab), bool)
    hit = lab[pairs[:, 0]] == lab[pairs[:, 1]]
    same[pairs[hit, 0]] = same[pairs[hit, 1]] = True
    has_neighbour = np.zeros(len(lab), bool)
    has_neighbour[pairs.ravel()] = True
    return int((has_neighbour & ~same).sum())


def test_gfa_smoothing_changes_scores_but_keeps_shapes(image):
    plain = Segmenter(REF, device="cpu").predict(image, ["cup", "table", "sky"])
    smooth = Segmenter(REF, device="cpu", smooth_omega=0.5).predict(image, ["cup", "table", "sky"])
    assert smooth.segment_scores.shape == plain.segment_scores.shape
    assert not np.allclose(smooth.segment_scores, plain.segment_scores)
    # a walk mixes neighbours, so fewer isolated labels remain: segments whose label no adjacent
    # segment shares
    assert (smooth.label_map != plain.label_map).mean() < 0.5
    assert np.array_equal(smooth.segment_ids, plain.segment_ids)
    n_plain, n_smooth = _isolated(plain), _isolated(smooth)
    assert n_smooth < n_plain and n_plain > 0, (n_plain, n_smooth)
    with pytest.raises(ValueError):
        Segmenter(REF, device="cpu", smooth_omega=1.0)


def test_free_form_queries_and_synonyms_merged_by_max(image):
    seg = Segmenter(REF, device="cpu")
    ids, P_syn, names = seg.segment_scores(image, ["a small white cup; mug", "wooden table"])
    _, P_sep, _ = seg.segment_scores(image, ["a small white cup", "mug", "wooden table"])
    assert names == ["a small white cup", "wooden table"]
    torch.testing.assert_close(P_syn[:, 0], torch.maximum(P_sep[:, 0], P_sep[:, 1]))
    torch.testing.assert_close(P_syn[:, 1], P_sep[:, 2])
    with pytest.raises(ValueError, match="proposals"):
        Segmenter(REF, device="cpu", proposals="slic")


def test_signature_lists_predictor_settings_plus_overlay():
    """Segmenter passes ``**settings`` to its Predictor (one keyword list, Predictor's); its
    signature still shows every setting with its default, and a misspelt one is refused."""
    from reme.inference.predictor import Predictor

    def keywords(obj):
        return {name: p.default for name, p in inspect.signature(obj).parameters.items()
                if p.kind is p.KEYWORD_ONLY}

    seg, pred = keywords(Segmenter), keywords(Predictor)
    assert seg == {**pred, "overlay": None}
    assert next(iter(inspect.signature(Segmenter).parameters)) == "reference"
    with pytest.raises(TypeError, match=r"Segmenter.*'topk'.*'top_k'"):
        Segmenter(REF, topk=5)


def test_proposal_pixels_sets_the_felzenszwalb_working_size():
    """proposal_pixels: proposals at about that many pixels, maps at the image's size; the view
    cache keys on the proposal settings, so a changed size is not served stale proposals."""
    from reme.proposals import felzenszwalb_segments

    image = photo("coffee")                                             # 400 x 600
    seg = Segmenter(REF, device="cpu", proposal_pixels=30_000, unlabelled=False)
    assert seg.proposer.max_pixels == 30_000
    small = seg.predict(image, ["cup", "table"])
    assert small.label_map.shape == small.segment_ids.shape == image.shape[:2]
    expected = felzenszwalb_segments(image, seg.felzenszwalb, 30_000)
    assert np.array_equal(small.segment_ids, expected)
    seg.proposer.max_pixels = None                                      # same Segmenter, same pixels
    full = seg.predict(image, ["cup", "table"])
    assert np.array_equal(full.segment_ids, felzenszwalb_segments(image, seg.felzenszwalb))
    assert not np.array_equal(full.segment_ids, small.segment_ids)
    with pytest.raises(ValueError, match="proposal_pixels"):
        Segmenter(REF, device="cpu", proposal_pixels=0)
