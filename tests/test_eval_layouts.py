"""ReME's detectron2-style dataset layouts next to mmseg's: tiny fixtures of each, written from
the shared VOC and ADE samples into tmp_path, must decode to the same label maps and give the
same mIoU; ``reme eval --suite paper`` on a root with two benchmarks present."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED, needs_shared
from reme.eval import Protocol, evaluate, open_dataset
from reme.eval.suite import AVERAGES, PEERS, averages, run_suite, summary_markdown

SCALE = 6          # samples are ~513 px; fixtures are ~85 px


def _small(path: Path, nearest: bool) -> np.ndarray:
    with Image.open(path) as im:
        im = im if nearest else im.convert("RGB")
        w, h = im.size
        return np.array(im.resize((max(w // SCALE, 8), max(h // SCALE, 8)),
                                  Image.NEAREST if nearest else Image.BILINEAR))


def _save(arr: np.ndarray, path: Path, jpeg: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, **({"quality": 95} if jpeg else {}))


def _voc_trainid(raw: np.ndarray, background: int) -> np.ndarray:
    """ReME's prepare_voc.py: 0 (background) -> ``background``, k -> k-1, 255 stays."""
    return np.where(raw == 0, background, np.where(raw == 255, 255, raw - 1))


def voc_fixture(root: Path, n: int | None = None) -> list[str]:
    """VOC-21 / VOC-20 in mmseg's tree under ``root/mmseg/VOC2012`` and ReME's detectron2 tree under
    ``root/d2/VOCdevkit/VOC2012`` (same JPEG bytes in both); returns the ids."""
    ids = sorted(p.stem for p in (SHARED / "voc_samples/masks").glob("*.png"))[:n]
    mm, d2 = root / "mmseg/VOC2012", root / "d2/VOCdevkit/VOC2012"
    for k in ids:
        _save(_small(SHARED / f"voc_samples/images/{k}.png", False), mm / f"JPEGImages/{k}.jpg", jpeg=True)
        (d2 / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (d2 / f"JPEGImages/{k}.jpg").write_bytes((mm / f"JPEGImages/{k}.jpg").read_bytes())
        raw = _small(SHARED / f"voc_samples/masks/{k}.png", True)
        _save(raw, mm / f"SegmentationClass/{k}.png")
        _save(_voc_trainid(raw, 20), d2 / f"annotations_detectron2_bg/val/{k}.png")
        no_bg = _voc_trainid(raw, 255)
        if (no_bg != 255).any():            # prepare_voc.py writes a mask only when it has a label
            _save(no_bg, d2 / f"annotations_detectron2/val/{k}.png")
    for tree in (mm, d2):
        (tree / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
        (tree / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return ids


def ade_fixture(root: Path) -> None:
    """ADE-150 (mmseg: raw 0..150, 0 = other; detectron2: value - 1, 255 ignore), and from the same
    masks COCO-Stuff-171 (train ids in both trees) and PC-59 (VOC-2010 trees)."""
    mm, d2 = root / "mmseg", root / "d2"
    for p in sorted((SHARED / "ade_samples/images").glob("*.jpg")):
        img, raw = _small(p, False), _small(SHARED / f"ade_samples/masks/{p.stem}.png", True)
        shifted = np.where(raw == 0, 255, raw - 1)
        _save(img, mm / f"ADEChallengeData2016/images/validation/{p.stem}.jpg", jpeg=True)
        _save(raw, mm / f"ADEChallengeData2016/annotations/validation/{p.stem}.png")
        _save(img, d2 / f"ADEChallengeData2016/images/validation/{p.stem}.jpg", jpeg=True)
        _save(shifted, d2 / f"ADEChallengeData2016/annotations_detectron2/validation/{p.stem}.png")
        _save(img, mm / f"coco_stuff164k/images/val2017/{p.stem}.jpg", jpeg=True)
        _save(shifted, mm / f"coco_stuff164k/annotations/val2017/{p.stem}_labelTrainIds.png")
        _save(img, d2 / f"coco_stuff164k/images/val2017/{p.stem}.jpg", jpeg=True)
        _save(shifted, d2 / f"coco_stuff164k/annotations_detectron2/val2017/{p.stem}.png")
        _save(raw, d2 / f"coco_stuff164k/annotations/val2017/{p.stem}.png")      # raw stuff ids: not read
        pc = np.where(raw > 59, 0, raw)                                           # PC-60 values 0..59
        _save(img, mm / f"VOC2010/JPEGImages/{p.stem}.jpg", jpeg=True)
        _save(pc, mm / f"VOC2010/SegmentationClassContext/{p.stem}.png")
        _save(img, d2 / f"VOCdevkit/VOC2010/JPEGImages/{p.stem}.jpg", jpeg=True)
        _save(np.where(pc == 0, 255, pc - 1), d2 / f"VOCdevkit/VOC2010/annotations_detectron2/pc59_val/{p.stem}.png")
    for p in (mm / "ADEChallengeData2016/images/validation").iterdir():      # one JPEG encoding for both trees
        for sub in ("ADEChallengeData2016/images/validation", "coco_stuff164k/images/val2017",
                    "VOCdevkit/VOC2010/JPEGImages"):
            (d2 / sub / p.name).write_bytes(p.read_bytes())
        for sub in ("coco_stuff164k/images/val2017", "VOC2010/JPEGImages"):
            (mm / sub / p.name).write_bytes(p.read_bytes())


class BlockSegmenter:
    """Fake segmenter: 8x8-pixel blocks as segments, scores a fixed function of each block's mean
    colour and of the query string (so every class gets some pixels); counts its calls."""

    def __init__(self):
        self.reference = None
        self.calls = 0

    def segment_scores(self, image, classes):
        self.calls += 1
        h, w = image.shape[:2]
        by, bx = np.arange(h)[:, None] // 8, np.arange(w)[None, :] // 8
        ids = (by * ((w + 7) // 8) + bx).astype(np.int32)
        n = int(ids.max()) + 1
        mean = np.zeros((n, 3))
        np.add.at(mean, ids.ravel(), image.reshape(-1, 3).astype(float))
        mean /= np.maximum(np.bincount(ids.ravel(), minlength=n), 1)[:, None]
        W = np.stack([np.random.default_rng(zlib.crc32(c.encode())).normal(size=3) for c in classes], 1)
        return ids, torch.from_numpy(np.exp(2 * np.tanh(mean / 128 - 1) @ W)).float(), list(classes)


PROTO = Protocol(short_side=None)


@needs_shared
@pytest.mark.parametrize("name", ["voc21", "voc20"])
def test_voc_layouts_same_labels_and_miou(tmp_path, name):
    voc_fixture(tmp_path)
    mm = open_dataset(name, tmp_path / "mmseg/VOC2012")
    d2 = open_dataset(name, tmp_path / "d2")                    # found under VOCdevkit/VOC2012
    assert mm.meta["layout"]["name"] == "mmseg" and d2.meta["layout"]["name"] == "detectron2"
    assert d2.meta["layout"]["masks"] == {"voc21": "annotations_detectron2_bg/{split}",
                                          "voc20": "annotations_detectron2/{split}"}[name]
    both = {s.key: s for s in d2}
    assert set(both) <= {s.key for s in mm} and len(both) >= len(mm) - 2
    seen_bg = False
    for s in mm:
        gt = mm.load_mask(s)
        if s.key not in both:                                   # VOC-20 d2: no mask when nothing is labelled
            assert name == "voc20" and (gt < 0).all()
            continue
        assert np.array_equal(gt, d2.load_mask(both[s.key]))
        seen_bg |= name == "voc21" and bool((gt == 0).any())
    assert seen_bg or name == "voc20"                           # background (20 last in d2) reads as class 0
    a = evaluate(BlockSegmenter(), mm, PROTO, progress=False)
    b = evaluate(BlockSegmenter(), d2, PROTO, progress=False)
    assert np.array_equal(a.confusion, b.confusion) and a.miou == b.miou and a.miou > 0
    if name == "voc21":
        assert a.background_class == b.background_class == "background"
        assert a.to_dict()["iou"]["background"] > 0


@needs_shared
def test_voc21_background_last_misread_changes_miou(tmp_path):
    """The check above can fail: reading the d2 VOC-21 masks as if mmseg's (background first)
    gives other labels and another mIoU."""
    voc_fixture(tmp_path, n=4)
    root = tmp_path / "d2/VOCdevkit/VOC2012"
    right = open_dataset("voc21", root)
    wrong = open_dataset("voc21", root, images=root / "JPEGImages", masks=root / "annotations_detectron2_bg/val",
                         layout="mmseg")
    assert wrong.label_lut is None and right.label_lut is not None
    s = right.samples[0]
    assert not np.array_equal(right.load_mask(s), wrong.load_mask(s))
    assert evaluate(BlockSegmenter(), right, PROTO, progress=False).miou != \
        evaluate(BlockSegmenter(), wrong, PROTO, progress=False).miou


@needs_shared
@pytest.mark.parametrize("name,mm_root", [("ade150", "ADEChallengeData2016"), ("coco_stuff171", "coco_stuff164k"),
                                          ("pc59", "VOC2010")])
def test_ade_based_layouts_same_miou(tmp_path, name, mm_root):
    ade_fixture(tmp_path)
    mm = open_dataset(name, tmp_path / "mmseg" / mm_root)
    d2 = open_dataset(name, tmp_path / "d2", layout="detectron2")
    assert d2.meta["layout"]["name"] == "detectron2" and mm.meta["layout"]["name"] == "mmseg"
    assert [s.key for s in mm] == [s.key for s in d2] and len(mm) == 3
    for s, t in zip(mm, d2):
        gt = mm.load_mask(s)
        assert np.array_equal(gt, d2.load_mask(t)) and (gt >= 0).any()
    a = evaluate(BlockSegmenter(), mm, PROTO, progress=False)
    b = evaluate(BlockSegmenter(), d2, PROTO, progress=False)
    assert np.array_equal(a.confusion, b.confusion) and a.miou == b.miou


def test_layout_option_errors(tmp_path):
    with pytest.raises(ValueError, match="has no 'detectron2' layout"):
        open_dataset("pc60", tmp_path, layout="detectron2")
    with pytest.raises(ValueError, match="generic"):
        open_dataset("generic", images=tmp_path, masks=tmp_path, classes_file=tmp_path / "c.txt", layout="mmseg")
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClass").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="annotations_detectron2_bg"):
        open_dataset("voc21", tmp_path, layout="detectron2")


def test_averages_and_peers():
    a = averages({"voc21": 50.0, "voc20": 70.0})
    assert a["avg8"]["miou"] is None and a["avg8"]["partial"] == 60.0 and a["avg8"]["present"] == 2
    full = averages({k: float(i) for i, k in enumerate(AVERAGES["avg10"])})
    assert full["avg10"]["miou"] == 4.5 and full["avg8"]["miou"] == 3.5
    v2 = next(p for p in PEERS if p.name.startswith("CorrCLIPv2"))
    assert round(sum(v2.miou.values()) / 10, 1) == v2.averages["avg10"]      # the README's 51.0


@needs_shared
def test_suite_two_benchmarks_summary_and_resume(tmp_path):
    voc_fixture(tmp_path, n=3)
    root, out = tmp_path / "d2", tmp_path / "out"
    seg = BlockSegmenter()
    s1 = run_suite(seg, root, out, reference_path="fake", protocol_overrides={"short_side": None}, progress=False)
    rows = {r["benchmark"]: r for r in s1["benchmarks"]}
    assert {k for k, r in rows.items() if r["status"] == "done"} == {"voc21", "voc20"}
    assert sum(r["status"] == "missing" for r in rows.values()) == 8
    assert rows["voc21"]["layout"] == "detectron2" and s1["averages"]["avg8"]["present"] == 2
    calls = seg.calls
    assert calls > 0
    md = (out / "summary.md").read_text()
    assert all(p.name in md and p.source in md for p in PEERS) and "**reme** (this run)" in md
    assert md.count("missing:") == 8 and "- pc60: missing:" in md
    saved = json.loads((out / "summary.json").read_text())
    assert saved["miou"]["voc21"] == rows["voc21"]["miou"] and len(saved["peers"]) == len(PEERS)
    mtime = (out / "voc21/results.json").stat().st_mtime_ns
    s2 = run_suite(seg, root, out, reference_path="fake", protocol_overrides={"short_side": None}, progress=False)
    assert seg.calls == calls and (out / "voc21/results.json").stat().st_mtime_ns == mtime
    assert {r["status"] for r in s2["benchmarks"] if r["status"] != "missing"} == {"resumed"}
    assert s2["miou"] == s1["miou"]
    run_suite(seg, root, out, reference_path="fake", protocol_overrides={"short_side": 64}, progress=False)
    assert seg.calls > calls                                    # another protocol: recomputed
    assert "| SCLIP |" in summary_markdown(s2)


@needs_shared
def test_run_eval_records_layout(tmp_path):
    from reme.eval.commands import run_eval

    voc_fixture(tmp_path, n=2)
    for lay in ("mmseg", "detectron2"):
        root = tmp_path / ("mmseg/VOC2012" if lay == "mmseg" else "d2")
        text = run_eval(dataset="voc21", reference=BlockSegmenter(), root=root, layout=lay, out=tmp_path / lay,
                        protocol_kw={"short_side": 0}, vis=0, progress=False)
        assert text.startswith("voc21: mIoU") and f"; {lay} layout" in text.splitlines()[0]
    a, b = (json.loads((tmp_path / lay / "results.json").read_text()) for lay in ("mmseg", "detectron2"))
    assert a["dataset_meta"]["layout"]["name"] == "mmseg" and b["dataset_meta"]["layout"]["name"] == "detectron2"
    assert b["dataset_meta"]["layout"]["label_lut"] == "voc21_background_last"
    assert a["miou"] == b["miou"] and a["confusion"] == b["confusion"]


@needs_shared
def test_cli_suite_with_tiny_reference(tmp_path, classical, minilm):
    """``reme eval --suite paper`` end to end (a GT reference of the fixture's own photos, classical
    encoder + MiniLM); the second run loads no model and rewrites no result."""
    from reme.build.annotations import MaskFolder
    from reme.build.pipeline import build_gt_reference
    from reme.eval.names import benchmark_classes, display_names
    from test_eval_runner import _reme

    voc_fixture(tmp_path, n=3)
    mm = tmp_path / "mmseg/VOC2012"
    names = display_names(benchmark_classes("voc21"))
    build_gt_reference(mm / "JPEGImages", MaskFolder(mm / "SegmentationClass", names), classical, minilm,
                       progress=False).save(tmp_path / "ref")
    args = ["eval", "--suite", "paper", "--data-root", tmp_path / "d2", "--out", tmp_path / "suite", "--layout",
            "detectron2", "--reference", tmp_path / "ref", "--limit", "1", "--short-side", "64", "--vis", "0", "--device",
            "cpu", "-q"]
    res = _reme(*args)
    assert "- ade150: missing:" in res.output and "CorrCLIPv2-L" in res.output and "voc21: done" in res.output
    d = json.loads((tmp_path / "suite/voc21/results.json").read_text())
    assert d["dataset_meta"]["layout"]["name"] == "detectron2" and d["num_images"] == 1
    mtime = (tmp_path / "suite/voc20/results.json").stat().st_mtime_ns
    res = _reme(*args)
    assert "voc20: resumed" in res.output and (tmp_path / "suite/voc20/results.json").stat().st_mtime_ns == mtime
    assert _reme("eval", "--suite", "paper", "--dataset", "voc21", check=False).exit_code != 0
