"""``reme inspect``: the reference-set report (group sizes + knee, kept/dropped thumbnails,
synonym pairs, counts per stage)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO, SHARED, photo
from PIL import Image

from reme.build.filtering import knee_index
from reme.report.inspect import group_scores, group_sizes, inspect_reference
from reme.reference import ReferenceSet

DEFAULT_REF = REPO / "reference_sets" / "default"


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def caption_like(tmp_path):
    """A caption-mode-like reference: 12 roots of falling size, a knee-filtered "background"
    group, group-filter drops with scores, synonym pairs; source photos on disk."""
    rng = np.random.default_rng(0)
    root_dir = tmp_path / "photos"
    root_dir.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(photo(name)).save(root_dir / f"{name}.png")
    roots = ["cat", "kitten", "dog", "cup", "table", "wall", "sky", "tree", "road", "car", "rug", "lamp"]
    sizes = [40, 22, 14, 10, 8, 7, 6, 5, 4, 3, 2, 2]
    S, ps, pl, imgs = [], [], [], []
    for j, n in enumerate(sizes):
        base = rng.normal(size=16)
        for _ in range(n):
            S.append(base + 0.3 * rng.normal(size=16))
            ps.append(len(S) - 1)
            pl.append(j)
            imgs.append(["astronaut.png", "coffee.png", "chelsea.png"][len(S) % 3])
    S[0] = -S[1]                                       # an outlier inside "cat"
    m = len(S)
    dropped = {"image": ["coffee.png"] * 3 + ["chelsea.png"] * 60, "bbox": np.tile([10, 20, 50, 40], (63, 1)),
               "label": ["a white cup", "a tiny cat", "a cat"] + ["the background"] * 60,
               "root": ["cup", "cat", "cat"] + ["background"] * 60,
               "reason": ["group_filter"] * 3 + ["knee_filter"] * 60,
               "score": np.array([0.2, -0.1, 0.4] + [np.nan] * 60, np.float32)}
    dropped["bbox"][3:, 0] = np.arange(60)             # 60 distinct knee-dropped segments
    manifest = {"mode": "caption", "encoders": {"visual": "classical", "text": "minilm"}, "image_root": str(root_dir),
                "counts": {"images": 3, "captions": 15, "noun_phrases": 80, "proposals": 900, "paired_segments": 200,
                           "pairs": 186, "pairs_after_group_filter": 183, "pairs_after_knee_filter": 123,
                           "pairs_after_synonyms": 123, "final_segments": m},
                "ambiguous_roots_removed": ["background"], "synonym_pairs": [["cat", "kitten", 0.81], ["rug", "carpet", 0.7]]}
    ref = ReferenceSet(S_ref=_unit(np.array(S)), L_ref=_unit(rng.normal(size=(len(roots), 8))), pair_segment=ps,
                       pair_label=pl, labels=[f"a {r}" for r in roots], roots=roots, segment_image=imgs,
                       segment_bbox=np.tile([30, 40, 120, 90], (m, 1)), segment_area=np.full(m, 900),
                       manifest=manifest, segment_source=["caption_pairing"] * m, dropped=dropped)
    return ref, sizes, roots


def test_group_sizes_add_back_knee_dropped_segments(caption_like):
    ref, _, _ = caption_like
    got = group_sizes(ref)
    assert list(got)[0] == "background" and got["background"] == 60        # knee-dropped, counted back
    assert got["cat"] == 40 and got["lamp"] == 2                           # group-filter drops not counted
    assert list(got.values()) == sorted(got.values(), reverse=True)
    ref.manifest["knee_group_sizes"] = {"cat": 38, "background": 60, "dog": 14}   # recorded by the build
    assert group_sizes(ref) == {"background": 60, "cat": 38, "dog": 14}
    segs, score = group_scores(ref, "cat")
    assert len(segs) == 40 and segs[-1] == 0                               # the planted outlier is least typical
    assert np.all(np.diff(score) <= 1e-7) and score[-1] < 0 < score[0]


def test_report_of_caption_like_reference(caption_like, tmp_path):
    ref, _, _ = caption_like
    out = inspect_reference(ref, tmp_path / "report", max_groups=4, thumbs=5, thumb_size=48, reference_path="REF")
    s = json.loads((out / "summary.json").read_text())
    assert s["knee_filter_ran"] and s["ambiguous_roots"] == ["background"]
    vals = np.array(list(group_sizes(ref).values()))
    assert s["knee_rank"] == knee_index(vals)               # no recorded knee: recomputed on the log sizes
    ref.manifest["knee_filter"] = {"knee_rank": 1}            # recorded by the build: shown as is
    s2 = json.loads((inspect_reference(ref, tmp_path / "r2", max_groups=1, thumbs=1, thumb_size=32)
                     / "summary.json").read_text())
    assert s2["knee_rank"] == 1
    del ref.manifest["knee_filter"]
    assert s["dropped_by_reason"] == {"group_filter": 3, "knee_filter": 60}
    assert s["segment_source"] == {"caption_pairing": ref.num_segments} and s["images_readable"]
    assert [g["root"] for g in s["groups"]] == ["background", "cat", "kitten", "dog"]
    cat = next(g for g in s["groups"] if g["root"] == "cat")
    assert cat["kept_segments"] == 40 and cat["dropped_by_reason"] == {"group_filter": 2}
    for f in ("index.html", "counts.png", "group_sizes.png", "synonyms.png", "groups/cat.png", "groups/background.png"):
        assert (out / f).is_file(), f
    sheet = np.asarray(Image.open(out / "groups" / "cat.png").convert("RGB")).astype(int)
    assert sheet.shape[1] >= 5 * 48 and sheet[16:64, 4:52].std() > 10   # first kept tile: a real crop
    html = (out / "index.html").read_text()
    for text in ("REF", "counts.png", "group_sizes.png", "groups/cat.png", "kitten", "carpet", "background",
                 "knee_filter", "caption_pairing"):
        assert text in html, text
    assert "not readable" not in html
    # re-running replaces the earlier report; another folder is never overwritten
    inspect_reference(ref, out, max_groups=1, thumbs=2, thumb_size=32)
    assert not (out / "groups" / "dog.png").exists()
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        inspect_reference(ref, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_unreadable_image_root_gives_placeholders(caption_like, tmp_path):
    ref, _, _ = caption_like
    ref.manifest["image_root"] = str(tmp_path / "moved-away")
    out = inspect_reference(ref, tmp_path / "r", max_groups=2, thumbs=3, thumb_size=40)
    s = json.loads((out / "summary.json").read_text())
    assert not s["images_readable"]
    assert "not readable" in (out / "index.html").read_text()
    tile = np.asarray(Image.open(out / "groups" / "cat.png").convert("RGB"))[16:56, 4:44].astype(int)
    assert np.all(tile[..., 0] == tile[..., 2]) and (tile[..., 0] == 225).mean() > 0.5


def test_inspect_cli_on_embedded_reference(tmp_path):
    from typer.testing import CliRunner

    from reme.cli import app

    r = CliRunner().invoke(app, ["inspect", str(DEFAULT_REF), "--out", str(tmp_path / "rep"), "--max-groups", "3",
                                 "--thumbs", "4", "-q"])
    assert r.exit_code == 0, r.output
    from reme.reference import load_reference

    assert "index.html" in r.output and f"{load_reference(DEFAULT_REF).num_segments} segments" in r.output
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())
    man = json.loads((DEFAULT_REF / "manifest.json").read_text())
    assert s["num_segments"] == man["num_segments"] and s["mode"] == "gt" and not s["knee_filter_ran"]
    assert sum(s["group_sizes"].values()) == man["num_pairs"]              # GT mode: one label per segment
    assert s["images_readable"] == SHARED.is_dir()
    assert len(list((tmp_path / "rep" / "groups").glob("*.png"))) >= 3
    bad = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a reme reference set" in bad.output
