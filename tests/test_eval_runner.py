"""``evaluate`` end to end: a fake segmenter on synthetic data in every benchmark layout (exact
expected scores), a real GT reference built from synthetic photos, the OpenBench analyses,
the ablation runners and the ``reme eval`` / ``reme ablate`` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED, needs_shared
from reme.eval import Protocol, evaluate, open_dataset, sweep_thresholds
from reme.eval.openbench import distractor_pool, distractor_sweep, others_analysis, vocabulary_overlap
from reme.eval.ablation import NOISY_GT_VARIANTS
from test_eval_datasets import CASES, make_layout

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


class ColourSegmenter:
    """Fake segmenter: segments = connected colour regions of the synthetic images; a query
    scores 4 on segments of its colour (by its first word), 1 elsewhere; the query "decoy"
    scores 9 on green segments."""

    def __init__(self):
        self.reference = None

    def segment_scores(self, image, classes):
        names = [c.split(";")[0].strip() for c in classes]
        keys = list(COLORS)
        dist = np.stack([np.abs(image.astype(int) - np.array(c)).sum(2) for c in COLORS.values()])
        ids = dist.argmin(0).astype(np.int32)
        P = torch.ones((len(keys), len(names)))
        for q, n in enumerate(names):
            word = n.split()[0]
            if word in keys:
                P[keys.index(word), q] = 4.0
            if n == "decoy":
                P[keys.index("green"), q] = 9.0
        return ids, P, names


def colour_dataset(tmp_path, n=2):
    """Images: left third red, middle green, right blue; masks: 0 red, 1 green, 2 blue, top row ignored."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "classes.txt").write_text("red thing\ngreen thing, lawn\nblue thing\n")
    for i in range(n):
        img = np.zeros((12, 18, 3), np.uint8)
        mask = np.zeros((12, 18), np.uint8)
        for k, c in enumerate(COLORS.values()):
            img[:, 6 * k:6 * k + 6] = c
            mask[:, 6 * k:6 * k + 6] = k
        mask[0] = 255
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "lab").mkdir(exist_ok=True)
        Image.fromarray(img).save(tmp_path / f"img/{i}.png")
        Image.fromarray(mask).save(tmp_path / f"lab/{i}.png")
    return open_dataset("generic", images=tmp_path / "img", masks=tmp_path / "lab", classes_file=tmp_path / "classes.txt")


def test_evaluate_exact_scores_and_outputs(tmp_path):
    ds = colour_dataset(tmp_path)
    out = tmp_path / "out"
    res = evaluate(ColourSegmenter(), ds, Protocol(short_side=None), out_dir=out, num_vis=1, progress=False)
    assert res.miou == pytest.approx(100.0) and res.pixel_acc == pytest.approx(100.0)
    assert res.confusion.sum() == 2 * 11 * 18                     # the ignored top row is not counted
    d = json.loads((out / "results.json").read_text())
    assert d["num_images"] == 2 and d["miou"] == pytest.approx(100.0)
    assert d["majority"]["miou"] == pytest.approx(100 / 9)          # one class everywhere: IoU 1/3 for it only
    assert np.array(d["confusion"]).tolist() == res.confusion.tolist()
    assert "| red thing | 100.00 |" in (out / "results.md").read_text()
    assert (out / "confusion.png").stat().st_size > 0
    vis = sorted((out / "vis").iterdir())
    assert len(vis) == 1 and Image.open(vis[0]).width == 3 * 18 + 8
    # resized protocol: still exact (nearest upsampling of constant regions)
    assert evaluate(ColourSegmenter(), ds, Protocol(short_side=36, mode="slide", crop=24, stride=12),
                    progress=False).miou == pytest.approx(100.0)


def test_background_threshold_and_sweep(tmp_path):
    ds = colour_dataset(tmp_path)
    ds.background_index = 2                                        # "blue thing" plays background
    # blue is not queried; its segment scores 1 for both queries -> confidence 0.5
    res = evaluate(ColourSegmenter(), ds, Protocol(short_side=None, bg_threshold=0.6), progress=False)
    assert res.miou == pytest.approx(100.0) and res.background_class == "blue thing"
    rows = sweep_thresholds(ColourSegmenter(), ds, [0.0, 0.6, 0.9], Protocol(short_side=None), progress=False)
    assert [r["threshold"] for r in rows] == [0.0, 0.6, 0.9]
    assert rows[1]["miou"] == pytest.approx(100.0)
    assert rows[0]["miou"] < 100 and rows[2]["miou"] < 100       # never / always background
    assert rows[2]["set_fraction"] == pytest.approx(1.0)          # red/green confidence 0.8 < 0.9
    # background queried by name as well: blue wins its own segment, so threshold 0 is exact
    both = sweep_thresholds(ColourSegmenter(), ds, [0.0], Protocol(short_side=None, background="class"),
                            progress=False)
    assert both[0]["miou"] == pytest.approx(100.0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_evaluate_runs_on_every_reader(tmp_path, name):
    raw_vals, want = CASES[name]
    make_layout(tmp_path, name, raw_vals)
    ds = open_dataset(name, tmp_path)
    res = evaluate(ColourSegmenter(), ds, progress=False)
    valid = sum(int((ds.load_mask(s) >= 0).sum()) for s in ds)
    assert res.num_images == 2 and int(res.confusion[:ds.num_classes].sum()) == valid
    assert len(res.scores["iou"]) == ds.num_classes


def test_distractor_sweep_and_others(tmp_path):
    ds = colour_dataset(tmp_path)
    sweep = distractor_sweep(ColourSegmenter(), ds, [0, 1, 5], Protocol(short_side=None), pool=["decoy", "a", "b"],
                             out_dir=tmp_path / "o", progress=False)
    assert sweep["num_distractors"] == [0, 1, 3]                   # capped at the pool size
    assert sweep["miou"][0] == pytest.approx(100.0)
    assert sweep["miou"][1] == pytest.approx(200 / 3)              # green pixels won by "decoy"
    assert sweep["distractor_fraction"][1] == pytest.approx(1 / 3)
    assert (tmp_path / "o/distractors.png").is_file() and (tmp_path / "o/distractors.md").is_file()
    rows = others_analysis(ColourSegmenter(), ds, ["blue thing"], [0.0, 0.6], Protocol(short_side=None),
                           progress=False)
    assert rows[0]["others_iou"] == 0.0 and rows[0]["others_fraction"] == 0.0
    assert rows[1]["miou"] == pytest.approx(100.0) and rows[1]["others_fraction"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="not in"):
        others_analysis(ColourSegmenter(), ds, ["purple thing"], [0.5], progress=False)


def test_distractor_pool_and_overlap(minilm):
    classes = [["person", "people"], ["car"], ["sky"]]
    cands = [["automobile"], ["sky-other", "sky"], ["violin"], ["toothbrush"], ["people"], ["banana"], ["kettle"],
             ["volcano"], ["harp"], ["anchor"], ["saddle"], ["lantern"]]
    pool = distractor_pool(classes, minilm, candidates=cands, seed=0)
    assert sorted(pool) == ["anchor", "banana", "harp", "kettle", "lantern", "saddle", "toothbrush", "violin", "volcano"]
    # "people", "sky-other" (its synonym "sky"): same names; "automobile": cosine 0.94 with "car"
    assert pool == distractor_pool(classes, minilm, candidates=cands, seed=0)
    assert pool != distractor_pool(classes, minilm, candidates=cands, seed=1)
    short = distractor_pool(classes, minilm, candidates=cands, seed=0, max_count=2, chunk=4)
    assert 2 <= len(short) <= 4 and short == pool[:len(short)]          # nested prefixes, lazily embedded

    class Seg:
        text_encoder = minilm
        templates = ("A photo of {}",)

        class reference:
            from reme.encoders.text import embed_labels as _e
            labels = ["person", "car", "cloudy sky"]
            L_ref = _e(minilm, labels, ("A photo of {}",))

    ov = vocabulary_overlap(Seg(), classes)
    assert ov["per_class"]["person"][0] == pytest.approx(1.0, abs=1e-5)
    assert ov["per_class"]["sky"][1] == "cloudy sky"
    far = vocabulary_overlap(Seg(), [["toothbrush"], ["violin"]])
    assert far["mean"] < ov["mean"] - 0.2


@pytest.fixture(scope="module")
def synth_reference(tmp_path_factory, classical, minilm):
    """A GT reference of 4 synthetic photos (sky above grass with texture) and 2 test images."""
    from reme.build.annotations import MaskFolder
    from reme.build.pipeline import build_gt_reference

    root = tmp_path_factory.mktemp("synth")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        (root / split / "img").mkdir(parents=True)
        (root / split / "lab").mkdir(parents=True)
        for i in range(n):
            img = np.empty((48, 64, 3), np.uint8)
            cut = 20 + 4 * i
            img[:cut] = (90, 150, 235)
            img[cut:] = (60, 150, 50)
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            mask = np.zeros((48, 64), np.uint8)
            mask[cut:] = 1
            Image.fromarray(img).save(root / split / "img" / f"{i}.png")
            Image.fromarray(mask).save(root / split / "lab" / f"{i}.png")
    (root / "classes.txt").write_text("sky\ngrass\n")
    ref = build_gt_reference(root / "train/img", MaskFolder(root / "train/lab", ["sky", "grass"]), classical, minilm,
                             progress=False)
    path = root / "ref"
    ref.save(path)
    return root, path, ref


def test_real_segmenter_on_synthetic_scene(synth_reference):
    root, path, _ = synth_reference
    ds = open_dataset("generic", images=root / "val/img", masks=root / "val/lab", classes_file=root / "classes.txt")
    res = evaluate(path, ds, Protocol(short_side=None), progress=False, device="cpu")
    assert res.miou > 80 and res.reference["path"] == str(path)
    assert res.reference["encoders"] == {"visual": "classical", "text": "minilm"}


def test_noisy_gt_ablation(synth_reference):
    from reme.eval.ablation import ablate_noisy_gt, apply_stages, corrupt_labels, reference_from_pairs

    root, _, ref = synth_reference
    labels, corrupted = corrupt_labels(ref, 0.25, seed=3)
    p = len(ref.pair_label)
    assert corrupted.sum() == round(0.25 * p) and np.all(labels[corrupted] != ref.pair_label[corrupted])
    assert np.array_equal(labels[~corrupted], ref.pair_label[~corrupted])
    new, keep, info = apply_stages(ref, labels, group_filter=True, drop_rate=0.3)
    before = 1 - corrupted.mean()
    after = (~corrupted[keep]).mean()
    assert after > before                                           # the group filter removes mostly noisy pairs
    assert after - before > 0.15 and (~keep & corrupted).sum() >= 0.7 * corrupted.sum()   # size of the effect
    from reme.build.filtering import group_median_filter

    np.testing.assert_array_equal(keep, group_median_filter(np.asarray(ref.S_ref, np.float32), ref.pair_segment,
                                                            labels, drop_rate=0.3))   # the build's stage, same result
    assert info["pairs_out"] == keep.sum() == len(new.pair_segment)
    syn, keep2, info2 = apply_stages(ref, labels, k_sim=1)
    assert keep2.all() and info2["pairs_out"] == 2 * p and len(info2["synonym_pairs"]) == 1
    sub = reference_from_pairs(ref, ref.pair_segment[:3], ref.pair_label[:3])
    assert sub.num_segments == len(set(ref.pair_segment[:3].tolist()))
    ds = open_dataset("generic", images=root / "val/img", masks=root / "val/lab", classes_file=root / "classes.txt")
    rows = ablate_noisy_gt(ref, ds, Protocol(short_side=None), noise=0.25, seed=3, progress=False,
                           variants={"none": {}, "fixed": dict(group_filter=True)}, out_dir=root / "abl")
    assert [r["variant"] for r in rows] == ["clean reference (no noise)", "noise 25%: none", "noise 25%: fixed"]
    assert rows[0]["label_precision"] == 100.0 and rows[1]["label_precision"] == pytest.approx(100 * before)
    assert rows[2]["label_precision"] == pytest.approx(100 * after)
    assert rows[0]["miou"] - rows[1]["miou"] > 1.0                 # 25 % label noise costs mIoU (measured: 2.1)
    assert "| noise 25%: fixed |" in (root / "abl/ablation.md").read_text()


def test_caption_ablation_with_tiny_clip(tmp_path, tiny_clip, classical, minilm):
    from reme.encoders import resolve_encoder
    from reme.eval.ablation import ablate_caption

    ckpt, _ = tiny_clip
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
        rows.append(json.dumps({"image": f"p{i}.png", "captions": ["A red car parked on green grass under a blue sky."]}))
    (tmp_path / "caps.jsonl").write_text("\n".join(rows) + "\n")
    ds = colour_dataset(tmp_path / "data", n=1)
    clip = resolve_encoder(f"clip:ReMETinyViT-T16:{ckpt}", device="cpu")
    out = ablate_caption(photos, f"captions:{tmp_path / 'caps.jsonl'}", clip, classical, minilm, ds,
                         Protocol(short_side=None), progress=False,
                         variants={"none": dict(group_filter=False, knee_filter=False, k_sim=0),
                                   "paper": dict(k_sim=30)})
    assert [r["variant"] for r in out] == ["none", "paper"]
    assert out[0]["pairs_after_synonyms"] == out[0]["pairs"] > 0
    assert out[1]["pairs_after_synonyms"] >= out[1]["pairs_after_knee_filter"]
    assert all(0 <= r["miou"] <= 100 for r in out)
    # 2 photos x 3 phrases (car, grass, sky): groups of 2 lose floor(0.3 * 2) = 0, 3 groups are below the
    # knee's min_groups, and with k_sim >= 3 every root gets the other two as synonyms: 3x the pairs
    assert out[1]["pairs_after_knee_filter"] == out[1]["pairs"] == 6
    assert out[1]["pairs_after_synonyms"] == 3 * out[1]["pairs_after_knee_filter"]


def _reme(*args, check=True):
    """``reme ARGS`` in-process (Typer's runner: no interpreter start-up per call)."""
    from typer.testing import CliRunner

    from reme.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    if check and res.exit_code != 0:
        raise AssertionError(f"reme {args} failed ({res.exit_code}):\n{res.output[-3000:]}\n{res.exception!r}")
    return res


def test_cli_eval_and_ablate(synth_reference, tmp_path):
    root, path, _ = synth_reference
    generic = ["--dataset", "generic", "--images", root / "val/img", "--masks", root / "val/lab",
               "--classes-file", root / "classes.txt"]
    res = _reme("eval", *generic, "--reference", path, "--out", tmp_path / "o", "--distractors", "0,5", "--overlap",
                "--device", "cpu", "-q")
    assert "generic: mIoU" in res.output and "distractor sweep" in res.output
    d = json.loads((tmp_path / "o/results.json").read_text())
    assert d["num_images"] == 2 and d["miou"] > 80 and d["reference"]["path"] == str(path)
    assert d["protocol"]["short_side"] is None                              # generic default: native size
    assert d["vocabulary_overlap"]["mean"] == pytest.approx(1.0, abs=1e-4)   # classes == reference labels
    assert d["distractor_sweep"]["num_distractors"] == [0, 5]
    assert (tmp_path / "o/distractors.png").is_file() and len(list((tmp_path / "o/vis").iterdir())) == 2
    assert d["reference"]["proposals"] == "felzenszwalb" and d["reference"]["smooth_omega"] == 0.0
    res = _reme("eval", *generic, "--reference", path, "--out", tmp_path / "o2", "--proposals", "cluster",
                "--n-clusters", "3", "--smooth-omega", "0.3", "--retrieval", "topk", "--vis", "0", "--device", "cpu", "-q")
    d2 = json.loads((tmp_path / "o2/results.json").read_text())
    assert (d2["reference"]["proposals"], d2["reference"]["smooth_omega"], d2["reference"]["retrieval"]) == ("cluster", 0.3, "topk")
    # Felzenszwalb partitions the synthetic scene exactly (100); 3 k-means clusters + smoothing + FAISS
    # lose a little at region borders (measured 97.9), never much
    assert d["miou"] - 5 < d2["miou"] < d["miou"]
    bad = _reme("eval", "--dataset", "voc21", "--root", tmp_path / "missing", "--reference", path, check=False)
    assert bad.exit_code == 2 and "not found" in bad.output
    res = _reme("ablate", "--kind", "noisy-gt", "--reference", path, *generic, "--limit", "1", "--noise", "0.2",
                "--out", tmp_path / "a", "--device", "cpu", "-q")
    assert "noise 20%: adaptive delta (0-50%)" in res.output
    assert len(json.loads((tmp_path / "a/ablation.json").read_text())["rows"]) == 1 + len(NOISY_GT_VARIANTS)


def test_cli_eval_subprocess(synth_reference, tmp_path):
    """The console entry point in a fresh interpreter (what users run)."""
    root, path, _ = synth_reference
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "reme.cli", "eval", "--dataset", "generic", "--images",
                           str(root / "val/img"), "--masks", str(root / "val/lab"), "--classes-file",
                           str(root / "classes.txt"), "--reference", str(path), "--limit", "1", "--vis", "0", "-q"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generic: mIoU" in proc.stdout and "(1 images" in proc.stdout


@needs_shared
def test_eval_shared_coco_object_with_default_reference(tmp_path):
    res = _reme("eval", "--dataset", "coco_object", "--root", SHARED / "coco_tiny", "--limit", "1", "--vis", "1",
                "--out", tmp_path, "--device", "cpu", "-q")
    d = json.loads((tmp_path / "results.json").read_text())
    assert d["num_images"] == 1 and d["background_class"] == "background"
    assert d["dataset_meta"]["layout"]["masks"] == "masks/{split}2017"
    assert d["protocol"]["short_side"] == 336 and d["protocol"]["bg_threshold"] == 0.4
    assert 0 <= d["miou"] <= 100 and "coco_object: mIoU" in res.output
