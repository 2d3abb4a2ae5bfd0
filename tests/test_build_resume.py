"""Streaming, sharded, resumable builds: identical output after kill -9, faults, any worker count."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY_CLIP, photo
from reme.build.annotations import MaskFolder
from reme.build.pipeline import CaptionBuildParams, build_caption_reference, build_gt_reference
from reme.encoders.base import TextEncoder
from reme.encoders.classical import ClassicalEncoder
from reme.build.filtering import group_median_filter
from reme.build._global_stages import ShardReader
from reme.reference import load_reference
from reme.build._shard_stages import ShardComputer
from reme.build._shards import ShardStore, ShardWriteError, encode_shard, pairs_table, segments_table

PARQUET = ("segments.parquet", "labels.parquet", "pairs.parquet", "dropped.parquet")
CLASSES = ["dark", "mid", "bright"]


class HashText(TextEncoder):
    """Deterministic weight-free text encoder for fast tests: a unit vector from sha256."""

    spec = "hash-text"
    dim = 16

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            v = np.frombuffer(hashlib.sha256(t.encode()).digest()[: self.dim], np.uint8).astype(np.float32) - 127.5
            out[i] = v / np.linalg.norm(v)
        return out


class SlowClassical(ClassicalEncoder):
    """The classical encoder with a pause per image, so a killed build stops half-way."""

    def dense_features(self, image):
        time.sleep(float(os.environ.get("REME_TEST_SLOW", "0")))
        return super().dense_features(image)


def make_dataset(root: Path, n: int = 8, size: tuple[int, int] = (64, 80)) -> tuple[Path, MaskFolder]:
    """n small crops of scikit-image photos with 3-class masks (grey level terciles)."""
    imgs, masks = root / "images", root / "masks"
    imgs.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    names = ("astronaut", "coffee", "chelsea", "rocket")
    h, w = size
    for i in range(n):
        src = photo(names[i % 4])
        y, x = 37 * i % (src.shape[0] - h), 53 * i % (src.shape[1] - w)
        crop = np.ascontiguousarray(src[y:y + h, x:x + w, :3])
        Image.fromarray(crop).save(imgs / f"img{i:02d}.png")
        grey = crop.mean(2)
        Image.fromarray(np.digitize(grey, np.quantile(grey, [1 / 3, 2 / 3])).astype(np.uint8)).save(masks / f"img{i:02d}.png")
    return imgs, MaskFolder(masks, CLASSES)


def same_files(a: Path, b: Path) -> bool:
    """Every file of two reference folders but the manifest (it holds "created" and run
    statistics) is byte-identical; the Parquet files must be among them."""
    names = sorted(p.name for p in a.iterdir() if p.name != "manifest.json")
    assert set(PARQUET) <= set(names) and names == sorted(p.name for p in b.iterdir() if p.name != "manifest.json")
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in names)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("build_data"))


@pytest.fixture(scope="module")
def vis():
    return ClassicalEncoder(image_size=48)


@pytest.fixture(scope="module")
def clean(data, vis, tmp_path_factory):
    """An uninterrupted single-process build (the reference every other run must equal)."""
    imgs, masks = data
    out = tmp_path_factory.mktemp("clean") / "ref"
    build_gt_reference(imgs, masks, vis, HashText(), out=out, shard_size=2, progress=False)
    return out


def test_shards_are_written_and_reused(data, vis, clean, tmp_path):
    imgs, masks = data
    work = tmp_path / "work"
    ref = build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "a", work_dir=work, shard_size=2,
                             progress=False)
    # 8 images make 8 one-image shards: at least min(images, MIN_SHARDS) shards (shard_images)
    assert sorted(p.name for p in (work / "shards").glob("*.json")) == [f"{i:06d}.json" for i in range(8)]
    assert ref.manifest["build"]["shards"] == 8 and ref.manifest["build"]["shards_reused"] == 0
    assert ref.manifest["counts"]["images"] == 8 and ref.manifest["counts"]["final_segments"] == ref.num_segments > 0
    assert not list(work.rglob("*.tmp")), "no temporary files may be left behind"
    again = build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "b", work_dir=work, shard_size=2,
                               progress=False)
    assert again.manifest["build"]["shards_reused"] == 8 and again.manifest["build"]["images_computed"] == 0
    assert same_files(tmp_path / "a", tmp_path / "b") and same_files(tmp_path / "a", clean)
    # the derived work folder OUT.work is removed after a successful build, an explicit one kept
    assert not (clean.parent / "ref.work").exists() and work.is_dir()


def test_tiny_memory_budget_streams_through_memory_maps(data, vis, clean, tmp_path):
    imgs, masks = data
    ref = build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "mm", shard_size=2,
                             memory_budget_mb=0.01, progress=False)
    assert isinstance(ref.S_ref, np.memmap)   # S_ref assembled on disk, not in the heap
    assert same_files(tmp_path / "mm", clean)


def test_shard_plan_gives_every_worker_work_and_ignores_the_worker_count():
    from reme.build.pipeline import MIN_SHARDS, shard_images

    for n in (0, 1, 2, 7, 20, 40, 63, 64, 65, 130, 1000, 5000):
        for size in (1, 2, 32):
            plans = {}
            for workers in (1, 2, 3, 16, MIN_SHARDS, MIN_SHARDS + 36):
                s = shard_images(n, size, workers)
                shards = -(-n // s)
                assert 1 <= s <= size
                assert shards >= min(n, workers), (n, size, workers)     # at least N shards when n >= N
                plans[workers] = s
            # up to MIN_SHARDS workers the plan is the same, so a resume with other workers reuses it
            assert len({plans[w] for w in plans if w <= MIN_SHARDS}) == 1
    with pytest.raises(ValueError):
        shard_images(10, 0, 1)


def test_two_workers_give_identical_files(data, vis, clean, tmp_path):
    imgs, masks = data
    work = tmp_path / "work"
    # the default shard size (32) holds all 8 images, yet 2 workers get 8 shards to share
    ref = build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "w2", work_dir=work, workers=2,
                             progress=False)
    assert ref.manifest["build"]["workers"] == 2 and ref.manifest["build"]["shards"] == 8
    again = build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "w1", work_dir=work, workers=1,
                               progress=False)
    assert again.manifest["build"]["shards_reused"] == 8                     # resumed with another worker count
    assert same_files(tmp_path / "w1", tmp_path / "w2") and same_files(tmp_path / "w2", clean)
    assert same_files(tmp_path / "w2", clean)
    loaded = load_reference(tmp_path / "w2")
    assert set(loaded.segment_source) == {"gt_proposal"} and set(loaded.labels) <= set(CLASSES)


def test_kill_9_then_resume_gives_identical_files(data, clean, tmp_path):
    imgs, masks = data
    work, out = tmp_path / "work", tmp_path / "ref"
    script = f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
from test_build_resume import HashText, SlowClassical
from reme.build.annotations import MaskFolder
from reme.build.pipeline import build_gt_reference
build_gt_reference({str(imgs)!r}, MaskFolder({str(masks.mask_root)!r}, {CLASSES!r}), SlowClassical(image_size=48),
                   HashText(), out={str(out)!r}, work_dir={str(work)!r}, shard_size=1, progress=False)
"""
    env = dict(os.environ, REME_TEST_SLOW="0.4")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((work / "shards").glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((work / "shards").glob("*.json")))
    assert 2 <= done < 8, f"the build should have been killed half-way, {done} of 8 shards done"
    assert not out.exists()
    os.environ["REME_TEST_SLOW"] = "0"
    try:
        ref = build_gt_reference(imgs, masks, SlowClassical(image_size=48), HashText(), out=out, work_dir=work,
                                 shard_size=1, progress=False)
    finally:
        del os.environ["REME_TEST_SLOW"]
    assert ref.manifest["build"]["shards_reused"] >= done >= 2
    # shard_size differs from the clean build (1 vs 2): the final files must still be identical
    assert same_files(out, clean)


def _failing_writer(monkeypatch, fail_at: int, err: int):
    import reme.build._shards as shards

    real = shards.write_bytes_atomic
    calls = {"n": 0}

    def write(path, data, **kw):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(err, os.strerror(err), str(path))
        return real(path, data, **kw)

    monkeypatch.setattr(shards, "write_bytes_atomic", write)


def test_disk_full_keeps_earlier_shards_and_resumes(data, vis, clean, tmp_path, monkeypatch):
    imgs, masks = data
    work = tmp_path / "work"
    _failing_writer(monkeypatch, fail_at=1 + 3 * 2 + 1, err=errno.ENOSPC)  # plan.json, 2 shards, then fail
    with pytest.raises(ShardWriteError, match="No space left on device.*re-run the same command") as info:
        build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "ref", work_dir=work, shard_size=2,
                           progress=False)
    assert info.value.errno == errno.ENOSPC
    store = ShardStore(work)
    done = [store.is_done(i) for i in range(8)]
    # the worker process may finish later shards before the error reaches the parent
    assert done[:3] == [True, True, False] and sum(done) >= 2
    assert not list(work.rglob("*.tmp")) and not (tmp_path / "ref").exists()
    monkeypatch.undo()
    ref = build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "ref", work_dir=work, shard_size=2,
                             progress=False)
    assert ref.manifest["build"]["shards_reused"] == sum(done)
    assert same_files(tmp_path / "ref", clean)


def test_permission_denied_and_full_disk_on_output(data, vis, clean, tmp_path, monkeypatch):
    imgs, masks = data
    _failing_writer(monkeypatch, fail_at=1, err=errno.EACCES)
    with pytest.raises(ShardWriteError, match="cannot write the work folder.*Permission denied"):
        build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "ref", shard_size=2, progress=False)
    monkeypatch.undo()
    from reme.reference import ReferenceSet

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ReferenceSet, "save", no_space)
    with pytest.raises(ShardWriteError, match="cannot write the reference set .*shards in .* are intact"):
        build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "ref", shard_size=2, progress=False)
    assert len(list((tmp_path / "ref.work" / "shards").glob("*.json"))) == 8  # kept for the re-run
    monkeypatch.undo()
    ref = build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "ref", shard_size=2, progress=False)
    assert ref.manifest["build"]["shards_reused"] == 8 and same_files(tmp_path / "ref", clean)
    assert not (tmp_path / "ref.work").exists()


def test_other_settings_refuse_to_resume(data, vis, tmp_path):
    imgs, masks = data
    work = tmp_path / "work"
    build_gt_reference(imgs, masks, vis, HashText(), images=["img00.png", "img01.png"], work_dir=work,
                       shard_size=1, progress=False)
    with pytest.raises(ValueError, match=r"different settings \(differs in: settings.min_purity\).*--no-resume"):
        build_gt_reference(imgs, masks, vis, HashText(), images=["img00.png", "img01.png"], work_dir=work,
                           shard_size=1, min_purity=0.9, progress=False)
    ref = build_gt_reference(imgs, masks, vis, HashText(), images=["img00.png", "img01.png"], work_dir=work,
                             shard_size=1, min_purity=0.9, resume=False, progress=False)
    assert ref.manifest["build"]["shards_reused"] == 0 and ref.manifest["min_purity"] == 0.9
    with pytest.raises(FileExistsError):
        build_gt_reference(imgs, masks, vis, HashText(), out=work, progress=False)


def test_config_recipe_rebuilds_the_same_shard(data, tmp_path):
    """Spawned workers and Ray actors rebuild the stages from a JSON recipe: same bytes."""
    from reme.encoders import resolve_encoder
    from reme.build._shard_stages import StageSettings

    imgs, masks = data
    comp = ShardComputer(StageSettings(mode="gt"), imgs, resolve_encoder("classical", device="cpu", image_size=40),
                         annotations=masks)
    cfg = json.loads(json.dumps(comp.config()))
    again = ShardComputer.from_config(cfg)
    assert again.visual.image_size == 40
    assert comp.compute_encoded(0, ["img00.png", "img01.png"]) == again.compute_encoded(0, ["img00.png", "img01.png"])
    cfg["visual"]["kwargs"] = {}
    assert ShardComputer.from_config(cfg).visual.image_size == 40      # the spec carries the size
    cfg["visual"]["spec"] = "classical"
    with pytest.raises(ValueError, match="differs from the caller's in \\['image_size', 'spec'\\]"):
        ShardComputer.from_config(cfg)


def _random_store(tmp_path, rng, n_shards=5, d=12):
    store = ShardStore(tmp_path / "w")
    store.open({"test": 1})
    S_all, seg_ids, roots = [], [], []
    off = 0
    for i in range(n_shards):
        m = int(rng.integers(3, 9))
        S = rng.normal(size=(m, d)).astype(np.float32)
        S /= np.linalg.norm(S, axis=1, keepdims=True)
        p = int(rng.integers(m, 2 * m))
        seg = rng.integers(0, m, p)
        rts = [f"r{int(x)}" for x in rng.integers(0, 6, p)]
        st = segments_table([f"im{i}"] * m, np.zeros((m, 4)), np.ones(m), ["x"] * m, S)
        pt = pairs_table(seg, [f"lab{j}" for j in range(p)], rts, rts)
        store.write(i, *encode_shard(st, pt, {"counts": {"images": 1}}))
        S_all.append(S)
        seg_ids.append(seg + off)
        roots += rts
        off += m
    return store, np.concatenate(S_all), np.concatenate(seg_ids), roots


@pytest.mark.parametrize("adaptive", [False, True])
def test_group_filter_over_shards_equals_in_memory(tmp_path, adaptive):
    rng = np.random.default_rng(3)
    store, S, ps, roots = _random_store(tmp_path, rng)
    reader = ShardReader(store, 5, S.shape[1])
    names = sorted(set(roots))
    rid = np.array([names.index(r) for r in roots])
    want_keep, want_score = group_median_filter(S, ps, roots, drop_rate=0.3, adaptive=adaptive, return_scores=True)
    for budget in (1, 7, 10_000):  # one group per pass, a few groups per pass, everything at once
        keep, score = group_median_filter(reader, ps, rid, drop_rate=0.3, adaptive=adaptive, return_scores=True,
                                          budget_rows=budget)
        np.testing.assert_array_equal(keep, want_keep)
        np.testing.assert_array_equal(score, want_score)
    assert (~want_keep).any()
    np.testing.assert_array_equal(reader.embeddings(np.array([0, 4, len(S) - 1])), S[[0, 4, len(S) - 1]])


def test_relabel_over_shards_equals_in_memory(tmp_path):
    from reme.build.filtering import relabel_dropped

    rng = np.random.default_rng(4)
    store, S, ps, roots = _random_store(tmp_path, rng)
    reader = ShardReader(store, 5, S.shape[1])
    names = sorted(set(roots))
    rid = np.array([names.index(r) for r in roots])
    keep = group_median_filter(S, ps, roots, drop_rate=0.3)
    want_new, want_sim = relabel_dropped(S, ps, rid.tolist(), keep, min_similarity=0.2)
    assert (want_new >= 0).any() and ((want_new < 0) & ~keep).any()   # some relabelled, some left dropped
    for budget in (1, 5, 10_000):
        new, sim = relabel_dropped(reader, ps, rid, keep, min_similarity=0.2, budget_rows=budget)
        np.testing.assert_array_equal(new, want_new)
        np.testing.assert_allclose(sim, want_sim, rtol=1e-5)


def test_caption_mode_workers_identical_and_filter_params_reuse_shards(data, vis, tiny_clip, tmp_path):
    from reme.encoders import resolve_encoder

    imgs, _ = data
    words = ["a brown cat", "the blue sky", "a red cup", "a small dog", "the white wall", "a green tree"]
    with open(tmp_path / "caps.jsonl", "w") as fh:
        for i in range(8):
            fh.write(json.dumps({"image": f"img{i:02d}.png",
                                 "captions": [f"{words[i % 6]} next to {words[(i + 1) % 6]} and {words[(i + 2) % 6]}."]}) + "\n")
    cap = resolve_encoder(f"captions:{tmp_path / 'caps.jsonl'}", device="cpu")
    clip = resolve_encoder(f"clip:{TINY_CLIP}:{tiny_clip[0]}", device="cpu")
    params = CaptionBuildParams(k_sim=3, knee_min_groups=100)
    work = tmp_path / "work"
    r1 = build_caption_reference(imgs, cap, clip, vis, HashText(), params=params, out=tmp_path / "c1",
                                 work_dir=work, shard_size=3, progress=False)
    r2 = build_caption_reference(imgs, cap, clip, vis, HashText(), params=params, out=tmp_path / "c2",
                                 workers=2, shard_size=3, progress=False)
    assert same_files(tmp_path / "c1", tmp_path / "c2") and r2.manifest["build"]["workers"] == 2
    c = r1.manifest["counts"]
    assert r2.manifest["counts"] == c
    assert c["captions"] == 8 and c["pairs"] == 24 and c["pairs_after_group_filter"] < c["pairs"]
    assert c["pairs_after_synonyms"] > c["pairs_after_knee_filter"] and len(r1.manifest["synonym_pairs"]) == 3
    assert len(r1.dropped["label"]) == c["pairs"] - c["pairs_after_knee_filter"]
    # filter settings act on the shards only: a different drop rate recomputes no image
    r3 = build_caption_reference(imgs, cap, clip, vis, HashText(), params=CaptionBuildParams(drop_rate=0.0, k_sim=0),
                                 work_dir=work, shard_size=3, progress=False)
    assert r3.manifest["build"]["shards_reused"] == 8
    assert r3.manifest["counts"]["pairs_after_group_filter"] == c["pairs"]


def test_cli_build_with_workers_and_work_dir(data, tmp_path):
    imgs, masks = data
    sub = tmp_path / "imgs"
    sub.mkdir()
    for name in ("img00.png", "img01.png", "img02.png"):
        (sub / name).symlink_to(imgs / name)
    cls = tmp_path / "classes.txt"
    cls.write_text("\n".join(CLASSES))
    args = [sys.executable, "-m", "reme.cli", "build-reference", "--images", str(sub), "--masks",
            str(masks.mask_root), "--classes-file", str(cls), "--visual-encoder", "classical", "--out",
            str(tmp_path / "ref"), "--workers", "2", "--shard-size", "1", "--batch-size", "2", "--work-dir",
            str(tmp_path / "w"), "--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["images"] == 3 and counts["final_segments"] > 0
    man = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert man["build"]["workers"] == 2 and man["build"]["shards"] == 3 and (tmp_path / "w" / "plan.json").is_file()
    assert len(list((tmp_path / "w" / "shards").glob("*.json"))) == 3  # an explicit --work-dir is kept


def test_bad_build_options_are_refused(data, vis, tmp_path):
    imgs, masks = data
    for kw, msg in [({"engine": "spark"}, "engine must be 'local' or 'ray'"), ({"workers": 0}, "workers must be"),
                    ({"shard_size": 0}, "shard_size and batch_size"), ({"images": ["../x.png"]}, "escapes the image root"),
                    ({"images": ["img00.png", "img00.png"]}, "listed twice")]:
        with pytest.raises(ValueError, match=msg):
            build_gt_reference(imgs, masks, vis, HashText(), progress=False, **kw)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['wokers'\\]"):
        build_gt_reference(imgs, masks, vis, HashText(), progress=False, wokers=2)


@pytest.mark.slow
def test_spawned_workers_rebuild_encoders_from_specs(data, tmp_path):
    """The start method used with GPUs: workers rebuild encoders from specs, same files."""
    from reme.encoders import resolve_encoder

    imgs, masks = data
    vis = resolve_encoder("classical", device="cpu", image_size=48)
    a = tmp_path / "fork"
    build_gt_reference(imgs, masks, vis, HashText(), out=a, shard_size=2, progress=False)
    ref = build_gt_reference(imgs, masks, vis, HashText(), out=tmp_path / "spawn", shard_size=2, workers=2,
                             start_method="spawn", progress=False)
    assert ref.manifest["build"]["workers"] == 2 and same_files(a, tmp_path / "spawn")


class _ThreadRecordingEncoder(ClassicalEncoder):
    """Appends torch's thread count at every forward to a file (the worker is another process)."""

    def __init__(self, log: Path):
        super().__init__()
        self.log = str(log)

    def dense_features(self, image):
        import torch

        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {torch.get_num_threads()}\n")
        return super().dense_features(image)


def test_one_worker_on_cpu_computes_on_one_thread(data, tmp_path):
    """With one worker (after an entry point set two threads) the shards are computed in a worker
    process on one torch thread, like every worker of a larger pool: the files do not depend on the
    worker count. An in-process threadpoolctl limit used to leave torch on two threads."""
    import torch

    imgs, masks = data
    log = tmp_path / "threads.txt"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        build_gt_reference(imgs, masks, _ThreadRecordingEncoder(log), HashText(), out=tmp_path / "ref",
                           shard_size=2, workers=1, progress=False)
    finally:
        torch.set_num_threads(before)
    rows = [line.split() for line in log.read_text().splitlines()]
    assert rows and {n for _, n in rows} == {"1"}
    assert {pid for pid, _ in rows} != {str(os.getpid())}
