"""``reme add-examples`` and ``reme segment --overlay`` (issue 15): GT folders taught by example
change the labels of the taught region, ``--undo`` gives back the base exactly, an interrupted
run resumes, ``--from-segment`` takes the ids ``reme segment --segment-ids`` writes, errors
exit 2 with one line, and the rows added for a frame are GT mode's rows for it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO, SHARED, needs_shared, photo
from reme.cli import app
from reme.eval.ablation import reference_from_pairs
from reme.reference.overlay import Overlay, load_overlay
from reme.reference import load_reference

REF = REPO / "reference_sets" / "default"
CLASSES = "cup,table,saucer,kettle"
NAMES = ["kettle", "table"]   # mask value 0, 1 (classes file lines)


def cli(*args, code: int = 0):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, f"exit {res.exit_code}:\n{res.output}"
    return res


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """2,000 segments of the embedded default reference set."""
    full = load_reference(REF)
    sub = full.pair_segment < 2000
    path = tmp_path_factory.mktemp("base") / "ref"
    reference_from_pairs(full, full.pair_segment[sub], full.pair_label[sub]).save(path)
    return path


def _write_example(root, key: str, img: np.ndarray) -> np.ndarray:
    """Write images/<key> and masks/<key> (kettle in the lower-left block, table across the top
    quarter, 255 elsewhere); returns the kettle region (H, W) bool."""
    h, w = img.shape[:2]
    mask = np.full((h, w), 255, np.uint8)
    mask[: h // 4] = 1
    mask[h // 2:, : w // 3] = 0
    for folder, arr in (("images", img), ("masks", mask)):
        (root / folder / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / folder / key)
    return mask == 0


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt")
    region = _write_example(root, "coffee.png", photo("coffee")[::3, ::3].copy())
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return root, region


def _segment(tmp, base, image, *extra):
    out = tmp / "seg"
    cli("segment", image, "--classes", CLASSES, "--reference", base, "--out", out, "-q", *extra)
    stem = image.stem
    return np.array(Image.open(out / f"{stem}_labels.png")), json.loads((out / f"{stem}_scores.json").read_text())


def _add(base, overlay, root, *extra, code=0):
    return cli("add-examples", "--reference", base, "--overlay", overlay, "--images", root / "images",
               "--masks", root / "masks", "--classes-file", root / "classes.txt", "-q", *extra, code=code)


def test_taught_region_changes_and_undo_last_restores_the_base_exactly(tmp_path, base, gt):
    root, region = gt
    image, ov = root / "images" / "coffee.png", tmp_path / "ov"
    kettle = CLASSES.split(",").index("kettle")
    before, scores0 = _segment(tmp_path, base, image)
    summary = json.loads(_add(base, ov, root).stdout.strip().splitlines()[-1])
    assert summary["images_added"] == 1 and summary["rows_added"] > 0 and summary["images_skipped"] == 0
    assert "kettle" in summary["new_labels"] and summary["bytes"] > 0
    assert summary["rows"] == load_overlay(ov).num_rows == summary["rows_added"]
    after, scores1 = _segment(tmp_path, base, image, "--overlay", ov)
    assert (after[region] == kettle).mean() > 0.5 > (before[region] == kettle).mean()
    assert scores1["overlay"]["rows"] == summary["rows"]
    listed = [json.loads(line) for line in cli("add-examples", "--overlay", ov, "--list").stdout.splitlines()]
    assert [r["image"] for r in listed] == ["coffee.png"] and set(listed[0]["labels"]) <= set(NAMES)
    undo = json.loads(cli("add-examples", "--reference", base, "--overlay", ov, "--undo", "last").stdout)
    assert undo["removed_rows"] == summary["rows"] and undo["rows"] == 0
    again, scores2 = _segment(tmp_path, base, image, "--overlay", ov)
    np.testing.assert_array_equal(again, before)                          # the base, exactly
    assert scores2["max_segment_score"] == scores0["max_segment_score"]


def test_interrupted_run_saves_and_a_rerun_skips_done_images(tmp_path, base, monkeypatch):
    import reme.inference.segmenter as sm

    root, ov = tmp_path / "gt", tmp_path / "ov"
    _write_example(root, "a/coffee.png", photo("coffee")[::3, ::3].copy())
    _write_example(root, "b/chelsea.png", photo("chelsea")[::3, ::3].copy())
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    real, calls = sm.Segmenter.add_examples, []

    def interrupted(self, *a, **k):
        calls.append(k["image_name"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(sm.Segmenter, "add_examples", interrupted)
    res = _add(base, ov, root, "--save-every", "0", code=130)
    assert "a re-run continues" in res.output
    assert sorted(set(load_overlay(ov).images)) == ["a/coffee.png"]       # saved on the way out
    monkeypatch.setattr(sm.Segmenter, "add_examples", real)
    summary = json.loads(_add(base, ov, root).stdout.strip().splitlines()[-1])
    assert (summary["images_skipped"], summary["images_added"]) == (1, 1)
    assert sorted(set(load_overlay(ov).images)) == ["a/coffee.png", "b/chelsea.png"]
    summary = json.loads(_add(base, ov, root).stdout.strip().splitlines()[-1])
    assert (summary["images_skipped"], summary["images_added"], summary["rows_added"]) == (2, 0, 0)


def test_from_segment_uses_the_ids_segment_writes(tmp_path, base, gt):
    root, _ = gt
    image, ov = root / "images" / "coffee.png", tmp_path / "ov"
    kettle = CLASSES.split(",").index("kettle")
    before, _ = _segment(tmp_path, base, image, "--segment-ids")
    ids = np.array(Image.open(tmp_path / "seg" / "coffee_segments.png"))
    assert ids.shape == before.shape
    target = int(np.bincount(ids.ravel()).argmax())                         # the largest segment
    assert (before[ids == target] != kettle).all()
    res = cli("add-examples", "--reference", base, "--overlay", ov, "--from-segment", image, target, "kettle", "-q")
    eid = json.loads(res.stdout)["example_id"]
    assert json.loads(res.stdout)["rows_added"] == 1
    after, _ = _segment(tmp_path, base, image, "--overlay", ov)
    assert (after[ids == target] == kettle).all()
    cli("add-examples", "--overlay", ov, "--reference", base, "--undo", eid)
    assert load_overlay(ov).num_rows == 0
    cli("add-examples", "--overlay", ov, "--reference", base, "--undo", eid, code=2)


def test_errors_exit_2_with_one_line(tmp_path, base, gt):
    root, _ = gt
    ov = tmp_path / "ov"

    def fails(*args, match: str):
        res = cli(*args, code=2)
        assert match in res.output and res.output.count("error:") == 1, res.output

    add = ("add-examples", "--reference", base, "--overlay", ov)
    fails("add-examples", "--reference", base, "--overlay", base / "ov", "--list", match="must not be inside")
    fails(*add, "--images", root / "images", "--masks", root / "masks", match="--masks needs --classes-file")
    fails(*add, "--images", root / "images", match="exactly one of --masks, --annotations")
    fails(*add, "--list", "--undo", "last", match="exactly one of --images")
    (tmp_path / "empty").mkdir()
    fails(*add, "--images", tmp_path / "empty", "--masks", root / "masks", "--classes-file", root / "classes.txt",
          match="no images")
    fails(*add, "--list", match="no overlay there")
    fails("segment", root / "images" / "coffee.png", "--classes", CLASSES, "--reference", base, "--overlay", ov,
          "--out", tmp_path / "o", match="no overlay there")
    # a mask of another size, and a mask value with no class line
    for name, mask, msg in (("size", np.zeros((5, 5), np.uint8), "has shape"),
                            ("value", np.full(photo("coffee")[::3, ::3].shape[:2], 7, np.uint8), "no line in the class file")):
        (tmp_path / name / "masks").mkdir(parents=True)
        Image.fromarray(mask).save(tmp_path / name / "masks" / "coffee.png")
        fails(*add, "--images", root / "images", "--masks", tmp_path / name / "masks", "--classes-file",
              root / "classes.txt", match=msg)
        assert not ov.exists()                                              # nothing written
    # an overlay made with another visual encoder is refused
    other = Overlay.empty(load_reference(base))
    other.encoders["visual"] = "classical"
    other.save(tmp_path / "other", base_path=base)
    fails("segment", root / "images" / "coffee.png", "--classes", CLASSES, "--reference", base, "--overlay",
          tmp_path / "other", "--out", tmp_path / "o", match="was made with visual encoder 'classical'")
    fails(*add[:-1], tmp_path / "other", "--from-segment", root / "images" / "coffee.png", "0", "kettle",
          match="was made with visual encoder 'classical'")


def test_add_examples_help_fits_80_columns():
    res = CliRunner().invoke(app, ["add-examples", "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert res.exit_code == 0 and max(len(line) for line in res.output.splitlines()) <= 80
    assert "--from-segment IMG SEGMENT_IDS LABEL" in res.output and "--overlay DIR" in res.output


@needs_shared
def test_rows_added_for_camvid_frames_are_gt_modes_rows(tmp_path):
    """Two CamVid train frames: the overlay rows ``add-examples`` adds for each frame equal (to
    float16 rounding) the rows ``build_gt_reference`` makes for it with the same encoder and the
    same (full-size) proposals."""
    from reme.build.annotations import MaskFolder
    from reme.build.pipeline import build_gt_reference
    from reme.classes import read_class_file
    from reme.encoders import resolve_encoder

    cam = SHARED / "camvid"
    keys = sorted(p.name for p in (cam / "images" / "train").glob("*.png"))[:2]
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
        for k in keys:
            (tmp_path / folder / k).symlink_to(cam / folder / "train" / k)
    names = [c[0] for c in read_class_file(cam / "classes.txt")]
    ref = build_gt_reference(tmp_path / "images", MaskFolder(tmp_path / "masks", names),
                             resolve_encoder("classical", device="cpu"), resolve_encoder("minilm", device="cpu"),
                             out=tmp_path / "ref", progress=False)
    summary = json.loads(cli("add-examples", "--reference", tmp_path / "ref", "--overlay", tmp_path / "ov",
                             "--images", tmp_path / "images", "--masks", tmp_path / "masks",
                             "--classes-file", cam / "classes.txt", "--device", "cpu", "--proposal-pixels", "0",
                             "-q").stdout)
    assert summary["images_added"] == 2 and summary["new_labels"] == []
    ov = load_overlay(tmp_path / "ov")
    seg_label = np.empty(ref.num_segments, object)
    seg_label[ref.pair_segment] = [ref.labels[j] for j in ref.pair_label]
    for k in keys:
        mine = np.flatnonzero([im == k for im in ov.images])
        theirs = np.flatnonzero([im == k for im in ref.segment_image])
        assert mine.size == theirs.size > 10
        np.testing.assert_allclose(np.asarray(ov.S[mine], np.float32), np.asarray(ref.S_ref[theirs], np.float32),
                                   atol=2e-3)
        np.testing.assert_array_equal(ov.bbox[mine], ref.segment_bbox[theirs])
        assert [ov.labels[i] for i in mine] == list(seg_label[theirs])


def test_eval_searches_the_overlay(tmp_path, base, gt):
    root, _ = gt
    from reme.inference.segmenter import Segmenter

    seg = Segmenter(base, device="cpu", overlay=tmp_path / "ov")
    lm = np.array(Image.open(root / "masks" / "coffee.png")).astype(np.int64)
    seg.add_examples(root / "images" / "coffee.png", np.where(lm == 255, -1, lm), NAMES, save=True)
    ev = ("eval", "--dataset", "generic", "--images", root / "images", "--masks", root / "masks",
          "--classes-file", root / "classes.txt", "--reference", base, "--vis", "0", "-q")

    def miou(*extra) -> float:
        return float(cli(*ev, *extra).stdout.split("mIoU ")[1].split()[0])

    assert miou("--overlay", tmp_path / "ov", "--out", tmp_path / "ev") > miou() + 10   # its own GT, taught
    import json

    info = json.loads((tmp_path / "ev" / "results.json").read_text())["reference"]
    assert info["overlay"]["path"] == str(tmp_path / "ov") and info["overlay"]["rows"] == seg.overlay.num_rows
    assert info["overlay"]["examples"] == 1
    res = cli(*ev, "--overlay", tmp_path / "missing", code=2)
    assert "no overlay there" in res.output
