"""Bad input during a reference build: every case is skipped or refused with a clear message,
never fatal for the rest of the build, and recorded in the manifest."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY_CLIP, photo
from reme.build.annotations import CocoInstances, MaskFolder
from reme.build.pipeline import CaptionBuildParams, build_caption_reference, build_gt_reference
from reme.encoders.classical import ClassicalEncoder
from reme.errors import ImageReadError
from reme.io import load_image, read_image
from test_build_resume import CLASSES, HashText, make_dataset


def huge_png(path: Path, w: int = 20000, h: int = 20000) -> None:
    """A valid 1-bit PNG of w x h pixels (a few hundred KB on disk, 400 MP when decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = zlib.compress(b"\x00" * ((1 + (w + 7) // 8) * h), 1)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def _mask_for(img: np.ndarray) -> np.ndarray:
    grey = img.mean(2)
    return np.digitize(grey, np.quantile(grey, [1 / 3, 2 / 3])).astype(np.uint8)


@pytest.fixture(scope="module")
def vis():
    return ClassicalEncoder(image_size=48)


def test_gt_build_survives_every_kind_of_bad_image(tmp_path, vis):
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    rgb = photo("chelsea")[:64, :80]
    Image.fromarray(rgb).save(imgs / "good.png")
    Image.fromarray(rgb).convert("L").save(imgs / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(imgs / "rgba.png")
    Image.fromarray(np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257).save(imgs / "deep16.png")
    Image.fromarray(rgb).convert("CMYK").save(imgs / "cmyk.tif")
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(imgs / "rotated.jpg", exif=exif)
    Image.fromarray(rgb[:1, :1]).save(imgs / "tiny.png")
    (imgs / "zero.png").write_bytes(b"")
    Image.fromarray(rgb).save(imgs / "full.jpg")
    data = (imgs / "full.jpg").read_bytes()
    (imgs / "full.jpg").unlink()
    (imgs / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (imgs / "garbage.png").write_text("this is not an image")
    huge_png(imgs / "huge.png")
    good = ["good.png", "gray.png", "rgba.png", "deep16.png", "cmyk.tif", "rotated.jpg", "tiny.png"]
    for name in good:
        Image.fromarray(_mask_for(load_image(imgs / name))).save(masks / (Path(name).stem + ".png"))
    assert load_image(imgs / "rotated.jpg").shape == (80, 64, 3)  # EXIF orientation applied
    ref = build_gt_reference(imgs, MaskFolder(masks, CLASSES), vis, HashText(), shard_size=3, workers=2,
                             progress=False)
    reasons = {s["image"]: s["reason"] for s in ref.manifest["skipped_images"]}
    assert set(reasons) == {"zero.png", "truncated.jpg", "garbage.png", "huge.png"}
    assert "empty (0 bytes)" in reasons["zero.png"] and "cannot decode" in reasons["truncated.jpg"]
    assert "cannot decode" in reasons["garbage.png"] and "exceeds" in reasons["huge.png"]
    assert set(ref.segment_image) == set(good)
    c = ref.manifest["counts"]
    assert c["images"] == 11 and c["images_skipped"] == 4 and c["final_segments"] == ref.num_segments
    rot = np.array([b for b, k in zip(ref.segment_bbox, ref.segment_image) if k == "rotated.jpg"])
    assert (rot[:, 0] + rot[:, 2]).max() <= 64 and (rot[:, 1] + rot[:, 3]).max() <= 80


def test_huge_png_is_refused_from_its_header(tmp_path):
    huge_png(tmp_path / "huge.png")
    with pytest.raises(ImageReadError, match="20000x20000 exceeds 100000000 pixels"):
        load_image(tmp_path / "huge.png")
    with pytest.raises(ImageReadError, match="only JPEGs are decoded at reduced size"):
        read_image(tmp_path / "huge.png", max_pixels=1_000_000)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "I;16", "CMYK", "RGBA", "1"])
def test_downscaling_keeps_orientation_and_converts_every_mode(tmp_path, mode):
    rgb = photo("chelsea")[:64, :80]
    img = Image.fromarray(rgb)
    img = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257) if mode == "I;16" else img.convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    out, orig = read_image(path, max_pixels=1000)
    assert orig == (64, 80) and out.dtype == np.uint8 and out.shape == (28, 35, 3)
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 80 rows x 64 columns
    Image.fromarray(rgb).save(tmp_path / "r.jpg", exif=exif)
    out, orig = read_image(tmp_path / "r.jpg", max_pixels=1200)
    assert orig == (80, 64) and out.shape == (38, 30, 3)
    with pytest.raises(ValueError, match="max_pixels"):
        read_image(path, max_pixels=0)


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    """A 14000 x 14000 JPEG (196 MP: over Pillow's own 179 MP bomb limit and our 100 MP)."""
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    n = 14000
    ramp = np.linspace(0, 255, n, dtype=np.float32)
    img = ((ramp[:, None] + ramp[None, :]) * 0.5).astype(np.uint8)
    img[: n // 2, : n // 3] = 30
    Image.fromarray(img).save(path, quality=40)
    return path


def test_huge_jpeg_is_decoded_at_reduced_size_with_bounded_memory(huge_jpeg):
    with pytest.raises(ImageReadError, match="exceeds"):
        load_image(huge_jpeg)  # without a size limit it is refused, never decoded
    # in a fresh interpreter (reme.io alone, no torch): peak memory of the reduced decode
    script = f"""
import resource, sys, types
pkg = types.ModuleType("reme"); pkg.__path__ = [{str(REPO / 'reme')!r}]; sys.modules["reme"] = pkg
from reme.io import read_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img, orig = read_image({str(huge_jpeg)!r}, max_pixels=4_000_000)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(img.shape[0], img.shape[1], orig[0], orig[1], (after - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    h, w, H0, W0, grew_mb = map(int, out)
    assert (H0, W0) == (14000, 14000) and h * w <= 4_000_000 and h > 1900
    assert grew_mb < 150, f"decoding grew the process by {grew_mb} MB; a full decode needs > 588 MB"


def test_caption_build_downscales_huge_and_handles_empty_or_orphan_captions(tmp_path, vis, tiny_clip, huge_jpeg):
    from reme.encoders import resolve_encoder

    imgs, _ = make_dataset(tmp_path / "d", n=3)
    (imgs / "huge.jpg").symlink_to(huge_jpeg)
    rows = [{"image": "img00.png", "captions": ["A brown cat sits under the blue sky."]},
            {"image": "img01.png", "captions": [""]},          # empty caption
            {"image": "img02.png", "captions": []},            # no caption
            {"image": "huge.jpg", "caption": "A red cup next to a small dog."},
            {"image": "gone.jpg", "captions": ["a cat"]},      # rows for images that do not exist
            {"image": "sub/also_gone.png", "captions": ["a dog"]}]
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cap = resolve_encoder(f"captions:{caps}", device="cpu")
    clip = resolve_encoder(f"clip:{TINY_CLIP}:{tiny_clip[0]}", device="cpu")
    ref = build_caption_reference(imgs, cap, clip, vis, HashText(), params=CaptionBuildParams(k_sim=0),
                                  max_image_pixels=40_000, progress=False)
    c = ref.manifest["counts"]
    assert c["images"] == 4 and c["images_skipped"] == 0 and c["images_without_captions"] == 2
    assert c["caption_rows_without_image"] == 2 and c["captions"] == 2 and c["pairs"] == 4
    (down,) = ref.manifest["downscaled_images"]
    assert down["image"] == "huge.jpg" and down["from"] == [14000, 14000] and down["to"][0] * down["to"][1] <= 40_000
    boxes = np.array([b for b, k in zip(ref.segment_bbox, ref.segment_image) if k == "huge.jpg"])
    assert len(boxes) and (boxes[:, 0] + boxes[:, 2]).max() <= 14000 and (boxes[:, 2] > 200).any()  # source pixels
    assert set(ref.segment_image) <= {"img00.png", "huge.jpg"}


@pytest.mark.parametrize("bad", ["../outside.jpg", "/etc/passwd", "a/../../b.jpg"])
def test_paths_escaping_the_image_root_are_rejected(tmp_path, vis, bad):
    from reme.encoders import resolve_encoder

    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image": bad, "captions": ["a cat"]}) + "\n")
    with pytest.raises(ValueError, match="escapes the image root"):
        resolve_encoder(f"captions:{caps}", device="cpu")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": bad, "height": 4, "width": 4}],
                               "categories": [{"id": 1, "name": "cat"}], "annotations": []}))
    with pytest.raises(ValueError, match="escapes the image root"):
        CocoInstances(ann)
    imgs, masks = make_dataset(tmp_path / "d", n=1)
    with pytest.raises(ValueError, match="escapes the image root"):
        build_gt_reference(imgs, masks, vis, HashText(), images=[bad], progress=False)


def test_annotations_with_unknown_ids_and_out_of_image_polygons(tmp_path, vis):
    imgs, _ = make_dataset(tmp_path / "d", n=2)          # img00.png, img01.png: 80 x 64
    coco = {
        "images": [{"id": 1, "file_name": "img00.png", "height": 64, "width": 80},
                   {"id": 2, "file_name": "img01.png", "height": 64, "width": 80},
                   {"id": 3, "file_name": "not_on_disk.png", "height": 64, "width": 80}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[-20, -20, 40, -20, 40, 30, -20, 30]]},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [[200, 200, 300, 200, 300, 300]]},
            {"id": 3, "image_id": 999, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]},
            {"id": 4, "image_id": 1, "category_id": 77, "segmentation": [[0, 0, 5, 0, 5, 5]]},
            {"id": 5, "image_id": 2, "category_id": 1, "segmentation": [[1, 2, 3]]},
            {"id": 6, "image_id": 2, "category_id": 2, "segmentation": [[10, 10, 70, 10, 70, 50, 10, 50]]},
            {"id": 7, "image_id": 2, "category_id": 1, "segmentation": {"counts": "bad", "size": [64, 80]}},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    ann = CocoInstances(tmp_path / "ann.json")
    assert ann.num_unknown_annotations == 2
    ref = build_gt_reference(imgs, ann, vis, HashText(), segments="masks", progress=False)
    c = ref.manifest["counts"]
    assert c["annotations_unknown_image"] == 2 and c["annotated_images_missing"] == 1 and c["images"] == 2
    assert ref.segment_image == ["img00.png", "img01.png"] and [ref.labels[j] for j in ref.pair_label] == ["cat", "dog"]
    x, y, w, h = ref.segment_bbox[0]
    assert (x, y) == (0, 0) and x + w <= 80 and y + h <= 64 and w > 30   # clipped to the image
    assert ref.manifest["skipped_images"] == []


def test_no_pickle_and_no_remote_code_in_the_library():
    """Safety: reme never loads pickles, loads torch checkpoints weights-only, and does not
    run code from model repositories."""
    bad = []
    for path in sorted((REPO / "reme").rglob("*.py")):
        text = path.read_text()
        for pattern in (r"^\s*import (cloud)?pickle", r"^\s*from (cloud)?pickle", r"\bpickle\.loads?\(",
                        r"trust_remote_code\s*=\s*True", r"allow_pickle\s*=\s*True", r"weights_only\s*=\s*False"):
            bad += [f"{path.name}: {m.group(0).strip()}" for m in re.finditer(pattern, text, re.M)]
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{path.name}: {m.group(0)}")
    assert not bad, bad
