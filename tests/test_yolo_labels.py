"""GT mode from YOLO label files (polygons of YOLO-seg, boxes): parsing, rasterisation, a CLI build
on real coco128 photos."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, needs_shared
from reme.build.annotations import (YoloLabels, annotations_from_config, read_class_names, read_yolo_labels,
                              rasterise_yolo_instance)

NAMES = ["cat", "dog", "car"]
COCO128 = SHARED / "coco128"
STEMS = ("000000000025", "000000000030", "000000000034")  # giraffes; potted plant + vase; zebras


def _shoelace(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


@pytest.fixture
def labels(tmp_path):
    root = tmp_path / "labels"
    (root / "sub").mkdir(parents=True)
    # 100 x 50 image (W x H). Line 1: a big box (dog) over the left half; line 2: a small
    # triangle (cat) inside it; line 3: a car box at the right edge.
    (root / "a.txt").write_text("1 0.25 0.5 0.5 1.0\n"
                                "0 0.1 0.2 0.4 0.2 0.1 0.8\n"
                                "\n"
                                "2 0.9 0.5 0.2 0.4\n")
    (root / "sub" / "b.txt").write_text("2 0.0 0.0 1.0 0.0 1.0 1.0 0.0 1.0\n")
    return root


def test_polygon_and_box_rasterisation(labels):
    ann = YoloLabels(labels, NAMES)
    lab = ann.label_map("a.jpg", (50, 100))
    assert lab.shape == (50, 100) and lab.dtype == np.int32
    # the dog box covers columns 0..49 exactly (pixel centres inside [0, 50))
    box = rasterise_yolo_instance("box", np.array([0.25, 0.5, 0.5, 1.0]), (50, 100))
    assert box[:, :50].all() and not box[:, 50:].any()
    # the car box: x in [80, 100), y in [15, 35)
    assert (lab[15:35, 80:] == 2).all() and (lab[:15, 80:] == -1).all() and (lab[35:, 80:] == -1).all()
    # the cat triangle (area 0.3 * 0.6 / 2 * 100 * 50 = 450 px) is painted over the larger dog box
    tri = rasterise_yolo_instance("polygon", np.array([[0.1, 0.2], [0.4, 0.2], [0.1, 0.8]]), (50, 100))
    assert abs(int(tri.sum()) - 450) <= 0.1 * 450
    assert (lab[tri] == 0).all() and (lab[:, :50][~tri[:, :50]] == 1).all()
    assert (lab[:, 50:80] == -1).all()
    # subfolders mirror the image folder; a full-image polygon covers every pixel
    assert (ann.label_map("sub/b.png", (7, 9)) == 2).all()


def test_overlap_order_largest_first(tmp_path):
    root = tmp_path / "l"
    root.mkdir()
    # small box first in the file, large box second: the small one must still stay on top
    (root / "x.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.8 0.8\n")
    lab = YoloLabels(root, NAMES).label_map("x.jpg", (40, 40))
    assert (lab[16:24, 16:24] == 0).all() and (lab[4:36, 4:36] >= 0).all()
    assert int((lab == 1).sum()) == 32 * 32 - 8 * 8


def test_image_without_label_file_is_unlabelled(labels):
    ann = YoloLabels(labels, NAMES)
    assert (ann.label_map("missing.jpg", (5, 6)) == -1).all() and ann.instance_masks("missing.jpg", (5, 6)) == []


@pytest.mark.parametrize("line, msg", [
    ("3 0.5 0.5 0.1 0.1", "class '3' is not an integer in [0, 3)"),
    ("-1 0.5 0.5 0.1 0.1", "class '-1'"),
    ("0.5 0.5 0.5 0.1 0.1", "class '0.5'"),
    ("0 0.5 0.5 0.1", "4 values"),
    ("0 0.1 0.1 0.2 0.2", None),  # 5 values: a valid box
    ("0 0.1 0.1 0.2 0.2 0.3", "6 values"),
    ("0 0.1 0.1 0.2 0.2 0.3 0.3 0.4", "8 values"),
    ("0 0.5 0.5 zero 0.1", "numbers expected"),
    ("0 12 40 30 80", "normalised"),
    ("0 0.5 0.5 nan 0.1", "normalised"),
    ("0 0.5 0.5 -0.005 0.1", "negative box"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, msg):
    root = tmp_path / "l"
    root.mkdir()
    (root / "x.txt").write_text(f"1 0.5 0.5 0.2 0.2\n\n{line}\n")
    ann = YoloLabels(root, NAMES)
    if msg is None:
        assert len(read_yolo_labels(root / "x.txt", 3)) == 2
        return
    with pytest.raises(ValueError) as exc:
        ann.label_map("x.jpg", (10, 10))
    assert "x.txt, line 3: " in str(exc.value) and msg in str(exc.value)


def test_config_round_trip_and_bad_folders(labels, tmp_path):
    ann = YoloLabels(labels, NAMES)
    back = annotations_from_config(json.loads(json.dumps(ann.config())))
    assert isinstance(back, YoloLabels) and back.label_names == NAMES
    assert np.array_equal(back.label_map("a.jpg", (50, 100)), ann.label_map("a.jpg", (50, 100)))
    assert ann.fingerprint()["kind"] == "yolo"
    with pytest.raises(FileNotFoundError):
        YoloLabels(tmp_path / "nope", NAMES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no YOLO label files"):
        YoloLabels(tmp_path / "empty", NAMES)


@needs_shared
def test_coco128_label_map_matches_polygon_area():
    names = read_class_names(COCO128 / "classes_coco80.txt")
    ann = YoloLabels(COCO128 / "labels" / "train2017", names)
    for stem in STEMS:
        W, H = Image.open(COCO128 / "images" / f"{stem}.jpg").size
        inst = read_yolo_labels(ann.label_path(f"{stem}.jpg"), len(names))
        assert inst and all(kind == "polygon" for _, kind, _ in inst)
        lab = ann.label_map(f"{stem}.jpg", (H, W))
        assert set(np.unique(lab)) == {-1} | {c for c, _, _ in inst}
        masks = ann.instance_masks(f"{stem}.jpg", (H, W))
        for (c, _, xy), (mask, li, _) in zip(inst, masks):
            area = _shoelace(xy * [W, H])
            assert li == c
            if area >= 500:  # edge pixels dominate tiny instances
                assert abs(int(mask.sum()) - area) <= 0.03 * area, (stem, c, int(mask.sum()), area)
        # the class of the smallest instance is painted last: its pixel count is its polygons' area
        # (up to overlaps between its own instances, and edge pixels)
        small = min(inst, key=lambda t: _shoelace(t[2]))[0]
        area = sum(_shoelace(xy * [W, H]) for c, _, xy in inst if c == small)
        assert abs(int((lab == small).sum()) - area) <= 0.03 * area, (stem, names[small])


@pytest.mark.slow
@needs_shared
def test_cli_gt_build_from_coco128_yolo_labels(tmp_path):
    from reme.reference import load_reference

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for stem in STEMS:
        (imgs / f"{stem}.jpg").symlink_to(COCO128 / "images" / f"{stem}.jpg")
    out = tmp_path / "ref"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "reme.cli", "build-reference", "--images", str(imgs), "--out", str(out),
           "--yolo-labels", str(COCO128 / "labels" / "train2017"),
           "--classes-file", str(COCO128 / "classes_coco80.txt"),
           "--visual-encoder", "classical", "--text-encoder", "minilm", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["images"] == 3
    ref = load_reference(out)
    names = read_class_names(COCO128 / "classes_coco80.txt")
    assert set(ref.labels) <= set(names) and {"giraffe", "zebra"} <= set(ref.labels)
    assert len(ref.S_ref) > 0 and set(ref.segment_image) == {f"{s}.jpg" for s in STEMS}


def test_cli_option_checks(labels, tmp_path):
    from typer.testing import CliRunner

    from reme.cli import app

    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    base = ["build-reference", "--images", str(tmp_path), "--out", str(tmp_path / "ref"), "--yolo-labels", str(labels),
            "--visual-encoder", "classical", "--text-encoder", "minilm"]
    both = CliRunner().invoke(app, base + ["--classes-file", str(classes), "--masks", str(tmp_path)])
    assert both.exit_code == 2 and "only one of" in both.output
    no_classes = CliRunner().invoke(app, base)
    assert no_classes.exit_code == 2 and "--yolo-labels needs --classes-file" in no_classes.output
    assert not (tmp_path / "ref").exists()


def test_gt_build_in_worker_processes(tmp_path):
    """Workers rebuild YoloLabels from its config; an image without a label file is background,
    a malformed file skips its image with the line in the manifest; 'masks' gives one segment
    per YOLO instance."""
    from conftest import photo
    from reme.build.pipeline import build_gt_reference
    from reme.encoders.classical import ClassicalEncoder
    from test_build_resume import HashText

    imgs, root = tmp_path / "images", tmp_path / "labels"
    imgs.mkdir()
    root.mkdir()
    rgb = photo("chelsea")[:64, :80]
    for name in ("boxed.png", "nolabel.png", "broken.png"):
        Image.fromarray(rgb).save(imgs / name)
    (root / "boxed.txt").write_text("0 0.5 0.5 1.0 1.0\n1 0.25 0.25 0.5 0.5\n")
    (root / "broken.txt").write_text("0 0.5 0.5 1.0 1.0\n0 0.5 0.5\n")
    vis = ClassicalEncoder(image_size=48)
    ref = build_gt_reference(imgs, YoloLabels(root, NAMES), vis, HashText(), background_label="background",
                             workers=2, shard_size=1, progress=False)
    assert [s["image"] for s in ref.manifest["skipped_images"]] == ["broken.png"]
    assert "broken.txt, line 2: " in ref.manifest["skipped_images"][0]["reason"]
    by_image = {}
    for seg, lab in zip(ref.pair_segment, ref.pair_label):
        by_image.setdefault(ref.segment_image[seg], set()).add(ref.labels[lab])
    assert by_image["nolabel.png"] == {"background"}
    assert by_image["boxed.png"] <= {"cat", "dog"} and "cat" in by_image["boxed.png"]
    masks = build_gt_reference(imgs, YoloLabels(root, NAMES), vis, HashText(), segments="masks",
                               images=["boxed.png"], progress=False)
    assert sorted(masks.labels[j] for j in masks.pair_label) == ["cat", "dog"]
    assert sorted(masks.segment_area.tolist()) == [32 * 40, 64 * 80]
