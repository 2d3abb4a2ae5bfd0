"""Hardening (issue 14): bounded memory on large photos, nothing lost or half-written,
integrity of reference files, and one-line errors instead of tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from conftest import REPO, photo
from reme.build.annotations import CocoInstances, read_class_names
from reme.errors import ImageReadError, ImageTypeError, ReferenceSetError
from reme.io import MAX_PIXELS, load_image
from reme.reference import load_reference, read_manifest
from reme.inference.segmenter import Segmenter, upsample_nearest
from reme.report.viz import save_label_png
from test_reference_io import make_ref

DEFAULT_REF = REPO / "reference_sets" / "default"


def run_cli(*args):
    """``reme ARGS`` in this process (typer's CliRunner; issue 21: a fresh interpreter per
    argument-error test cost 17-21 s): ``returncode``, ``stdout``, ``stderr`` like a subprocess."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from reme.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return SimpleNamespace(returncode=res.exit_code, stdout=res.stdout, stderr=res.stderr)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(path, side=11000):
    """A small (~20 kB) 1-bit PNG of side x side pixels (> MAX_PIXELS): a decompression bomb."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data)
                     + _png_chunk(b"IEND", b""))
    assert side * side > MAX_PIXELS
    return path


@pytest.fixture
def no_png_decode(monkeypatch):
    """Records every PngImageFile.load call (a full decode)."""
    calls = []
    orig = PngImagePlugin.PngImageFile.load

    def load(self, *a, **k):
        calls.append(self.size)
        return orig(self, *a, **k)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    return calls


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter(DEFAULT_REF, device="cpu")


# --- memory and decoding -------------------------------------------------------------------

def test_bomb_guard_reads_header_before_exif(tmp_path, no_png_decode):
    path = huge_png(tmp_path / "bomb.png")
    with pytest.raises(ImageReadError, match="exceeds"):
        load_image(path)
    assert no_png_decode == []  # refused from the header: getexif() would have decoded it


def test_lazy_pil_image_is_capped(tmp_path, no_png_decode, segmenter):
    path = huge_png(tmp_path / "bomb.png")
    with pytest.warns(Image.DecompressionBombWarning):               # Pillow's own guard only warns
        img = Image.open(path)
    with img:
        with pytest.raises(ImageReadError, match="exceeds"):
            load_image(img)
        with pytest.raises(ImageReadError, match="exceeds"):
            segmenter.predict(img, "cup")
    assert no_png_decode == []


def test_predict_works_at_bounded_size_and_returns_input_size(segmenter):
    img = photo("astronaut")                                          # 512 x 512
    small = Segmenter(segmenter.reference, device="cpu", max_working_pixels=128 * 96)
    res = small.predict(img, "person; astronaut, wall, floor", return_scores=True)
    h, w = res.extras["working_size"]
    assert h * w <= 128 * 96 and (h, w) != (512, 512)
    assert res.label_map.shape == res.segment_ids.shape == (512, 512)
    assert res.scores.shape == (512, 512, 3) and res.scores.dtype == np.float32
    assert res.segment_ids.max() < res.segment_scores.shape[0]
    # labels are the segments' argmax, probs are bilinear between them (within each row's range)
    lab = np.where(res.extras["unlabelled_segments"], -1, res.segment_scores.argmax(1))   # -1: "none of these"
    assert np.array_equal(res.label_map, lab[res.segment_ids])
    assert res.scores.max() <= res.segment_scores.max() + 1e-5
    frac = np.bincount(res.label_map[res.label_map >= 0], minlength=3) / res.label_map.size
    assert np.allclose(res.class_fractions, frac)
    full = segmenter.predict(img, "person; astronaut, wall, floor")
    assert full.extras["working_size"] == (512, 512)                # under the cap: unchanged


def test_working_size_keeps_exif_orientation(tmp_path, segmenter):
    img = Image.fromarray(photo("chelsea"))                            # 300 x 451
    exif = img.getexif()
    exif[0x0112] = 6                                                    # shown rotated 90 degrees
    img.save(tmp_path / "r.jpg", exif=exif)
    small = Segmenter(segmenter.reference, device="cpu", max_working_pixels=120 * 80)
    res = small.predict(tmp_path / "r.jpg", "cat, wall")
    assert res.label_map.shape == (451, 300)
    h, w = res.extras["working_size"]
    assert h > w and h * w <= 120 * 80


def test_upsample_nearest_matches_pil():
    a = np.random.default_rng(0).integers(0, 50, (7, 11)).astype(np.int32)
    up = upsample_nearest(a, (30, 23))
    ref = np.asarray(Image.fromarray(a).resize((23, 30), Image.NEAREST))
    assert up.shape == (30, 23) and np.array_equal(up, ref)


# --- nothing lost ---------------------------------------------------------------------------

def test_label_png_holds_more_than_256_classes(tmp_path):
    lab = np.arange(300 * 4, dtype=np.int32).reshape(40, 30) % 300
    save_label_png(lab, tmp_path / "l.png", n_classes=300)
    back = np.array(Image.open(tmp_path / "l.png"))
    assert np.array_equal(back.astype(np.int64), lab)
    save_label_png(lab % 7, tmp_path / "p.png", n_classes=7)         # palette PNG as before
    assert Image.open(tmp_path / "p.png").mode == "P"
    with pytest.raises(ValueError, match="do not fit"):
        save_label_png(lab, tmp_path / "x.png", n_classes=10)


def test_stale_temp_folders_are_removed(tmp_path):
    out = tmp_path / "ref"
    old_form = tmp_path / ".ref.k2j4x9.tmp"                           # reme before this change
    dead = tmp_path / ".ref.p999999999-abc.tmp"                        # no such process
    live = tmp_path / f".ref.p{os.getppid()}-abc.tmp"                   # a running writer: kept
    other = tmp_path / ".other.k2j4x9.tmp"                             # another output: kept
    for d in (old_form, dead, live, other):
        (d / "sub").mkdir(parents=True)
    make_ref().save(out)
    assert not old_form.exists() and not dead.exists()
    assert live.exists() and other.exists() and (out / "manifest.json").is_file()


def test_same_stem_inputs_do_not_overwrite(tmp_path):
    for sub, name in (("a", "astronaut"), ("b", "coffee")):
        (tmp_path / sub).mkdir()
        Image.fromarray(photo(name)[::4, ::4]).save(tmp_path / sub / "real.png")
    proc = run_cli("segment", tmp_path / "a" / "real.png", tmp_path / "b" / "real.png", "--classes", "cup,person",
                   "--out", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((tmp_path / "o" / "real_scores.json").read_text())
    b = json.loads((tmp_path / "o" / "real-2_scores.json").read_text())
    assert a["image"].endswith(os.path.join("a", "real.png")) and b["image"].endswith(os.path.join("b", "real.png"))
    assert "real-2" in proc.stderr and "real-2" in proc.stdout


# --- integrity ------------------------------------------------------------------------------

def test_index_faiss_is_verified(tmp_path):
    ref = tmp_path / "ref"
    load_reference(DEFAULT_REF).save(ref, with_index=True)  # the embedded set ships no index
    data = bytearray((ref / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ref / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(ReferenceSetError, match="index.faiss does not match the sha256"):
        load_reference(ref).load_index()
    (ref / "index.faiss").write_bytes(b"not a faiss index at all")     # header broken, manifest agrees
    man = json.loads((ref / "manifest.json").read_text())
    import hashlib

    man["files"]["index.faiss"] = hashlib.sha256(b"not a faiss index at all").hexdigest()
    (ref / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ReferenceSetError, match="cannot read .*index.faiss"):
        load_reference(ref).load_index()


@pytest.mark.parametrize("field, value", [("files", [1, 2]), ("visual_dim", "abc"), ("num_segments", 1.5),
                                          ("encoders", "classical"), ("templates", [1])])
def test_manifest_types_are_validated(tmp_path, field, value):
    ref = tmp_path / "ref"
    shutil.copytree(DEFAULT_REF, ref)
    man = json.loads((ref / "manifest.json").read_text())
    man[field] = value
    (ref / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ReferenceSetError, match=f"field '{field}'"):
        load_reference(ref)
    with pytest.raises(ReferenceSetError, match=f"field '{field}'"):
        read_manifest(ref)


# --- clear errors ---------------------------------------------------------------------------

def test_out_path_errors_are_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    for out, cause in ((tmp_path / "afile", "exists and is not a folder"),
                       (tmp_path / "afile" / "sub", "cannot write")):
        proc = run_cli("segment", "skimage:coffee", "--classes", "cup", "--out", out)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and str(out) in proc.stderr and cause in proc.stderr
    proc = run_cli("build-reference", "--images", tmp_path, "--out", tmp_path / "afile" / "ref")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "cannot write" in proc.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        proc = run_cli("segment", "skimage:coffee", "--classes", "cup", "--out", ro)
    finally:
        ro.chmod(0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(ro) in proc.stderr


def test_bad_logit_scales_are_refused(tmp_path):
    proc = run_cli("segment", "skimage:coffee", "--classes", "cup", "--segment-logit-scale", "nan",
                   "--out", tmp_path / "o")
    assert proc.returncode == 2 and "--segment-logit-scale must be a finite number in (0, 1000]" in proc.stderr
    proc = run_cli("segment", "skimage:coffee", "--classes", "cup", "--label-logit-scale", "1e308",
                   "--out", tmp_path / "o")                             # issue 22: gave NaN scores
    assert proc.returncode == 2 and "at most" not in proc.stderr and "(0, 1000]" in proc.stderr
    assert not (tmp_path / "o").exists()                                # refused before anything is written


def test_segmenter_refuses_bad_logit_scales(segmenter):
    for kw in ({"segment_logit_scale": float("nan")}, {"label_logit_scale": float("inf")},
               {"segment_logit_scale": 0.0}, {"label_logit_scale": -1.0}, {"label_logit_scale": 1e308}):
        with pytest.raises(ValueError, match="must be a finite number in"):
            Segmenter(segmenter.reference, device="cpu", **kw)
    for bad in (float("nan"), -0.1, float("inf")):                                # issue 22: 'nan' was accepted
        with pytest.raises(ValueError, match="others_threshold must be a finite number >= 0"):
            Segmenter(segmenter.reference, device="cpu", others_threshold=bad)


def test_class_list_errors_name_the_cause(tmp_path):
    proc = run_cli("segment", "skimage:coffee", "--classes", "", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "class list is empty" in proc.stderr
    binary = tmp_path / "classes.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(ValueError, match="classes.bin"):
        read_class_names(binary)
    proc = run_cli("segment", "skimage:coffee", "--classes-file", binary, "--out", tmp_path / "o")
    assert proc.returncode == 2 and "classes.bin" in proc.stderr and "Traceback" not in proc.stderr


def test_malformed_annotations_name_the_file(tmp_path):
    bad = tmp_path / "instances_bad.json"
    bad.write_text('{"images": [1, 2,')
    with pytest.raises(ValueError, match="instances_bad.json: not valid JSON"):
        CocoInstances(bad)


@pytest.mark.parametrize("bad", [b"\xff\xd8\xff", None, [1, 2, 3], torch.zeros(4, 4, 3, dtype=torch.uint8)])
def test_unsupported_image_inputs(bad, segmenter):
    with pytest.raises(ImageTypeError, match="PIL.Image.Image") as info:
        segmenter.predict(bad, "cup")
    assert isinstance(info.value, TypeError)


def test_float_array_error_reports_its_shape():
    with pytest.raises(ImageReadError, match=r"shape \(6, 5\) dtype float64"):
        load_image(np.zeros((6, 5)))


# --- first five minutes: what the result's class names and scores mean ----------------------

def test_result_names_and_row_sums_as_documented(segmenter):
    res = segmenter.predict(photo("coffee")[::2, ::2], "floor; ground, cup; mug, table", return_scores=True)
    assert res.classes == ["floor", "cup", "table"]                     # first synonym of each class
    rows = res.segment_scores.sum(1)
    assert rows.max() <= 1.0 + 1e-4 and rows.min() > 0                  # one label per reference segment
    doc = type(res).__doc__
    assert "first synonym" in doc and "does not sum to 1" in doc
