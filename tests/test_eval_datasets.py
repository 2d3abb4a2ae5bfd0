"""Dataset readers: a small synthetic dataset in each benchmark's on-disk layout, the generic
reader, the shipped class-name files, and the real shared data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SHARED, needs_shared
from reme.eval import BENCHMARKS, benchmark_classes, open_dataset
from reme.eval.datasets import decode_mask, read_mask
from reme.eval.names import parse_class_lines, read_class_file, shipped_class_files
from reme.report.viz import palette

H, W = 6, 8


def write_image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def write_mask(path: Path, values, *, mode: str = "L") -> np.ndarray:
    """A mask whose rows cycle through ``values``; saved as palette/grey PNG or 16-bit TIFF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.array([[values[(r + c) % len(values)] for c in range(W)] for r in range(H)])
    if mode == "P":
        img = Image.fromarray(arr.astype(np.uint8), mode="P")
        img.putpalette(palette(256).ravel().tolist())
    elif mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16))
    else:
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    img.save(path)
    return arr


def make_layout(root: Path, name: str, values, n: int = 2) -> list[np.ndarray]:
    """Files of benchmark ``name`` in its first (official) layout; returns the raw masks."""
    raws = []
    if name in ("voc21", "voc20", "pc60", "pc59", "pc459"):
        sub = {"voc21": "SegmentationClass", "voc20": "SegmentationClass", "pc60": "SegmentationClassContext",
               "pc59": "SegmentationClassContext", "pc459": "annotations_detectron2/pc459_val"}[name]
        split = "ImageSets/Segmentation/val.txt" if name.startswith("voc") else "ImageSets/SegmentationContext/val.txt"
        ids = [f"2008_00000{i}" for i in range(n)]
        for i, k in enumerate(ids):
            write_image(root / "JPEGImages" / f"{k}.jpg", i)
            ext, mode = (".tif", "I;16") if name == "pc459" else (".png", "P" if name.startswith("voc") else "L")
            raws.append(write_mask(root / sub / f"{k}{ext}", values, mode=mode))
        write_image(root / "JPEGImages" / "2008_999999.jpg", 9)      # an image outside the split
        (root / split).parent.mkdir(parents=True, exist_ok=True)
        (root / split).write_text("\n".join(ids) + "\n")
    elif name in ("coco_object", "coco_stuff171"):
        suffix = "_instanceTrainIds.png" if name == "coco_object" else "_labelTrainIds.png"
        for i in range(n):
            k = f"00000000{i:04d}"
            write_image(root / "images/val2017" / f"{k}.jpg", i)
            raws.append(write_mask(root / "annotations/val2017" / f"{k}{suffix}", values))
    elif name == "cityscapes":
        for i in range(n):
            city = ["frankfurt", "lindau"][i % 2]
            k = f"{city}_000000_00{i:04d}"
            write_image(root / "leftImg8bit/val" / city / f"{k}_leftImg8bit.png", i)
            raws.append(write_mask(root / "gtFine/val" / city / f"{k}_gtFine_labelTrainIds.png", values))
            write_mask(root / "gtFine/val" / city / f"{k}_gtFine_color.png", [0])      # must be ignored
    elif name == "ade150":
        for i in range(n):
            write_image(root / "images/validation" / f"ADE_val_0000000{i}.jpg", i)
            raws.append(write_mask(root / "annotations/validation" / f"ADE_val_0000000{i}.png", values))
    elif name == "ade847":
        for i in range(n):
            write_image(root / "images_detectron2/validation" / f"ADE_val_0000000{i}.jpg", i)
            raws.append(write_mask(root / "annotations_detectron2/validation" / f"ADE_val_0000000{i}.tif", values,
                                   mode="I;16"))
    else:
        raise KeyError(name)
    return raws


#: raw values written per benchmark -> the decoded ids they must become (-1 = ignore)
CASES = {
    "voc21": ([0, 15, 255], [0, 15, -1]),
    "voc20": ([0, 15, 255], [-1, 14, -1]),
    "pc60": ([0, 59, 255], [0, 59, -1]),
    "pc59": ([0, 59, 255], [-1, 58, -1]),
    "pc459": ([0, 458, 65535], [0, 458, -1]),
    "coco_object": ([0, 80, 255], [0, 80, -1]),
    "coco_stuff171": ([0, 170, 255], [0, 170, -1]),
    "cityscapes": ([0, 18, 255], [0, 18, -1]),
    "ade150": ([0, 1, 150], [-1, 0, 149]),
    "ade847": ([0, 846, 65535], [0, 846, -1]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_layouts(tmp_path, name):
    raw_vals, want_vals = CASES[name]
    raws = make_layout(tmp_path, name, raw_vals)
    ds = open_dataset(name, tmp_path)
    assert len(ds) == 2 and ds.spec is BENCHMARKS[name]
    assert ds.num_classes == {"voc21": 21, "voc20": 20, "pc60": 60, "pc59": 59, "pc459": 459, "coco_object": 81,
                              "coco_stuff171": 171, "cityscapes": 19, "ade150": 150, "ade847": 847}[name]
    lut = dict(zip(raw_vals, want_vals))
    for sample, raw in zip(ds, raws):
        m = ds.load_mask(sample)
        assert m.dtype == np.int64 and m.shape == (H, W)
        assert np.array_equal(m, np.vectorize(lut.get)(raw))
        assert ds.load_image(sample).shape == (H, W, 3)
    assert (ds.background_index == 0) == (name in ("voc21", "pc60", "coco_object"))


def test_split_file_selects_images(tmp_path):
    make_layout(tmp_path, "voc21", [0, 1])
    ds = open_dataset("voc21", tmp_path)
    assert [s.key for s in ds] == ["2008_000000", "2008_000001"]          # 2008_999999 is not in val.txt
    (tmp_path / "ImageSets/Segmentation/val.txt").unlink()                 # no split file: every mask
    assert len(open_dataset("voc21", tmp_path)) == 2


def test_cityscapes_label_ids_fallback(tmp_path):
    k = "frankfurt_000000_000001"
    write_image(tmp_path / "leftImg8bit/val/frankfurt" / f"{k}_leftImg8bit.png")
    write_mask(tmp_path / "gtFine/val/frankfurt" / f"{k}_gtFine_labelIds.png", [7, 26, 0, 33])
    ds = open_dataset("cityscapes", tmp_path)
    m = ds.load_mask(ds.samples[0])
    assert sorted(np.unique(m).tolist()) == [-1, 0, 13, 18]                # road, car, void, bicycle


def test_flat_layouts_and_overrides(tmp_path):
    # COCO-Object: the shared-data tree (masks/val2017/<id>.png) is accepted too
    write_image(tmp_path / "coco/images/val2017/000000000001.jpg")
    write_mask(tmp_path / "coco/masks/val2017/000000000001.png", [0, 1])
    ds = open_dataset("coco_object", tmp_path / "coco")
    assert len(ds) == 1 and ds.meta["layout"]["masks"] == "masks/{split}2017"
    # explicit folders keep the benchmark's conventions (ADE-150: reduce_zero_label)
    write_image(tmp_path / "a/img/x.jpg")
    write_mask(tmp_path / "a/lab/x.png", [0, 3])
    ds = open_dataset("ade150", images=tmp_path / "a/img", masks=tmp_path / "a/lab")
    assert sorted(np.unique(ds.load_mask(ds.samples[0])).tolist()) == [-1, 2]


def test_generic_reader(tmp_path):
    (tmp_path / "classes.txt").write_text("# a comment\nbackground\ncat, kitty; kitten\n\ndog\n")
    for i, sub in enumerate(["", "nested/"]):
        write_image(tmp_path / f"img/{sub}p{i}.png", i)
        write_mask(tmp_path / f"lab/{sub}p{i}.png", [0, 1, 2, 7, 200])
    write_mask(tmp_path / "lab/orphan.png", [1])                            # mask without image: skipped
    ds = open_dataset("generic", images=tmp_path / "img", masks=tmp_path / "lab", classes_file=tmp_path / "classes.txt",
                      ignore_index=7, background="background")
    assert [s.key for s in ds] == ["nested/p1", "p0"]
    assert ds.classes == [["background"], ["cat", "kitty", "kitten"], ["dog"]]
    assert ds.background_index == 0
    m = ds.load_mask(ds.samples[0])
    assert sorted(np.unique(m).tolist()) == [-1, 0, 1, 2]                    # 7 (ignore) and 200 (> C) -> -1
    assert len(ds.subset(limit=1)) == 1 and ds.subset(offset=1).samples[0].key == "p0"
    z = open_dataset("generic", images=tmp_path / "img", masks=tmp_path / "lab", classes_file=tmp_path / "classes.txt",
                     reduce_zero_label=True)
    assert sorted(np.unique(z.load_mask(z.samples[0])).tolist()) == [-1, 0, 1]


def test_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark"):
        open_dataset("voc2007", tmp_path)
    with pytest.raises(FileNotFoundError, match="tried"):
        open_dataset("ade150", tmp_path)
    with pytest.raises(ValueError, match="generic dataset needs"):
        open_dataset("generic", images=tmp_path)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="colour"):
        read_mask(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="appears twice"):
        parse_class_lines(["cat", "dog", "Cat, kitty"])
    with pytest.raises(FileNotFoundError):
        read_class_file(tmp_path / "nope.txt")
    assert decode_mask(np.array([[0, 5, 9]]), 6, ignore_index=9, reduce_zero_label=True).tolist() == [[-1, 4, -1]]


def test_shipped_class_files():
    files = shipped_class_files()
    want = {"voc21": 21, "voc20": 20, "pc60": 60, "pc59": 59, "pc459": 459, "coco_object": 81,
            "coco_stuff171": 171, "cityscapes": 19, "ade150": 150, "ade847": 847}
    assert {k: len(benchmark_classes(k)) for k in files} == want
    assert all(BENCHMARKS[b].classes in files for b in BENCHMARKS)
    assert benchmark_classes("voc21")[0][0] == "background"
    assert benchmark_classes("voc21")[1:] == benchmark_classes("voc20")
    assert benchmark_classes("pc60")[1:] == benchmark_classes("pc59")
    assert benchmark_classes("coco_stuff171")[:80] == benchmark_classes("coco_object")[1:]
    assert ["person", "people", "man", "woman"] in benchmark_classes("voc21")
    assert "eval/classnames/*.txt" in (REPO / "pyproject.toml").read_text()       # shipped as package data


@needs_shared
def test_shared_data_readers():
    coco = open_dataset("coco_object", SHARED / "coco_tiny")
    voc = open_dataset("voc21", SHARED / "voc_samples")
    ade = open_dataset("ade150", SHARED / "ade_samples")
    assert (len(coco), len(voc), len(ade)) == (50, 14, 3)
    assert [n for n in coco.names] == (SHARED / "coco_tiny/classes_coco_object.txt").read_text().split("\n")[:81]
    for ds, C in ((coco, 81), (voc, 21), (ade, 150)):
        for s in ds.samples[:3]:
            m = ds.load_mask(s)
            assert m.shape == ds.load_image(s).shape[:2]
            assert m.min() >= -1 and m.max() < C and (m >= 0).any()
    raw = read_mask(ade.samples[0].mask)
    assert np.array_equal(ade.load_mask(ade.samples[0]) == -1, raw == 0)          # ADE "other" is ignored
