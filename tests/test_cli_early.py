"""Nothing slow to refuse (issues 20 and 22): every check a command can make without models runs
before any model loads. In-process (typer's CliRunner); a Segmenter that would load is replaced
by one that fails the test."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from typer.testing import CliRunner

from reme.cli import app

CLASSES = ["--classes", "cup, table"]


@pytest.fixture
def no_models(monkeypatch):
    """Any Segmenter construction fails the test: the refusal must come first."""
    import reme.inference.segmenter as sm

    def boom(*a, **k):
        raise AssertionError("a Segmenter was built (models load) before the input was checked")

    monkeypatch.setattr(sm.Segmenter, "__init__", boom)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _png_bomb(path, side=11000):
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_bad_images_are_refused_before_models_load(tmp_path, no_models):
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "missing.jpg", "image file not found"),
             (tmp_path / "notes.jpg", "cannot decode image"),
             (tmp_path / "empty", "a folder with no images"),
             (_png_bomb(tmp_path / "bomb.png"), "exceeds 100000000 pixels"),
             ("skimage:nope", "unknown sample photo")]
    for path, msg in cases:
        res = invoke("segment", path, *CLASSES, "--out", tmp_path / "o")
        assert res.exit_code == 2 and msg in res.output, (path, res.output)
        assert "Traceback" not in res.output


@pytest.mark.parametrize("flag,value,msg", [
    ("--top-k", "-1", "--top-k must be an integer >= 0"),
    ("--smooth-omega", "1", "--smooth-omega must be a number in [0, 1)"),
    ("--smooth-omega", "nan", "--smooth-omega must be a number in [0, 1)"),
    ("--retrieval", "fast", "--retrieval must be 'exact' or 'topk'"),
    ("--proposals", "slic", "--proposals: proposals must be"),
    ("--n-clusters", "0", "--n-clusters must be an integer >= 1"),
    ("--others-threshold", "nan", "--others-threshold must be a finite number >= 0"),
    ("--label-logit-scale", "1e308", "--label-logit-scale must be a finite number in (0, 1000]"),
    ("--explain-segments", "0", "--explain-segments must be >= 1"),
    ("--proposal-pixels", "-1", "--proposal-pixels must be an integer >= 0"),
])
def test_bad_options_are_refused_before_models_load(tmp_path, no_models, flag, value, msg):
    res = invoke("segment", "skimage:coffee", *CLASSES, flag, value, "--out", tmp_path / "o")
    assert res.exit_code == 2 and msg in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_bad_manifest_templates_are_refused_before_models_load(tmp_path, no_models):
    import shutil

    from conftest import REPO

    ref = tmp_path / "ref"
    shutil.copytree(REPO / "reference_sets" / "default", ref)
    man = json.loads((ref / "manifest.json").read_text())
    man["templates"] = ["a photo of {0} and {0}"]
    (ref / "manifest.json").write_text(json.dumps(man))
    res = invoke("segment", "skimage:coffee", *CLASSES, "--reference", ref, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "field 'templates'" in res.output and str(ref) in res.output, res.output


def test_a_folder_is_read_as_its_images(tmp_path, monkeypatch):
    """``reme segment DIR`` segments the folder's images (issue 22: 'image file not found')."""
    import numpy as np
    from PIL import Image

    import reme.inference.segmenter as sm
    from reme.errors import ImageReadError

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg"):
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(photos / name)
    (photos / "readme.txt").write_text("skipped: not an image extension")
    seen = []

    from reme.inference.unlabelled import OFF

    class Fake:
        none_rule = OFF  # no coverage lines: only the loop over the folder's images is under test

        def __init__(self, *a, **k):
            pass

        def predict(self, path, classes, **k):
            seen.append(path)
            raise ImageReadError("stop here")  # the loop reports it and goes on

    monkeypatch.setattr(sm, "Segmenter", Fake)
    res = invoke("segment", photos, *CLASSES, "--out", tmp_path / "o", "-q")
    assert [p.replace("\\", "/").split("photos/")[1] for p in seen] == ["a.png", "sub/b.jpg"], res.output


def test_eval_options_are_refused_before_anything_loads(tmp_path, no_models, monkeypatch):
    import reme.eval.commands as commands

    monkeypatch.setattr(commands, "run_eval", lambda **k: pytest.fail("run_eval ran before the options were checked"))
    res = invoke("eval", "--dataset", "camvid", "--others-threshold", "nan", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "--others-threshold must be a finite number >= 0" in res.output, res.output
    res = invoke("eval", "--dataset", "camvid", "--proposal-pixels", "-5", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "--proposal-pixels must be an integer >= 0" in res.output, res.output


def test_refusing_a_missing_photo_imports_no_torch(tmp_path):
    """`reme segment missing.jpg` answers before torch is imported (issue 20: refused in well
    under a second; importing torch alone takes 2-3 s here)."""
    import subprocess
    import sys

    code = ("import sys\nfrom reme.cli import main\nsys.argv = ['reme', 'segment', sys.argv[1], '--classes', 'cat']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing.jpg")], capture_output=True,
                          text=True, timeout=300)
    assert proc.stdout.split() == ["exit", "2", "False"], proc.stdout + proc.stderr
    assert "not found" in proc.stderr
