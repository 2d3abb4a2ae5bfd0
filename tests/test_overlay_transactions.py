"""Overlay writes are transactions (issue 22): concurrent writers, in separate processes, keep
every row; undo by one writer is not undone by another's save."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

from conftest import REPO
from reme.reference import ReferenceSet
from reme.reference.overlay import Overlay, load_overlay

D1, D2 = 8, 4


def tiny_base() -> ReferenceSet:
    """A 3-segment, 2-label reference set built in memory (no models)."""
    rng = np.random.default_rng(0)
    S = rng.normal(size=(3, D1)).astype(np.float32)
    L = rng.normal(size=(2, D2)).astype(np.float32)
    S /= np.linalg.norm(S, axis=1, keepdims=True)
    L /= np.linalg.norm(L, axis=1, keepdims=True)
    return ReferenceSet(S_ref=S.astype(np.float16), L_ref=L, pair_segment=np.arange(3), pair_label=np.array([0, 1, 0]),
                        labels=["a", "b"], roots=["a", "b"], segment_image=["x"] * 3,
                        segment_bbox=np.zeros((3, 4), np.int32), segment_area=np.ones(3, np.int64),
                        manifest={"encoders": {"visual": "v", "text": "t"}, "templates": ["{}"]})


def add_one(ov: Overlay, label: str, seed: int) -> str:
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(1, D1))
    e = rng.normal(size=D2)
    return ov.add(s / np.linalg.norm(s), [label], image=f"img{seed}", bbox=np.zeros((1, 4)), area=np.ones(1),
                  mask_bbox=np.zeros((1, 4)), label_embeddings={label: e / np.linalg.norm(e)})


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_overlay_transactions import tiny_base, add_one
    from reme.reference.overlay import Overlay, load_overlay
    folder, who, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    ov = Overlay.empty(tiny_base())          # both start before the folder exists, like two CLI runs
    ov.path = folder
    go.with_name(go.name + who).touch()
    while not go.exists():
        time.sleep(0.01)
    for i in range(6):
        add_one(ov, f"label {{who}}", hash((who, i)) % 10000)
        ov.save(folder)
        time.sleep(0.02)
    print(ov.num_rows)
""")


def test_two_processes_adding_to_one_overlay_keep_every_row(tmp_path):
    """Two writer processes, each adding 6 examples and saving after each: the folder ends with
    all 12 (before issue 22 each save wrote only its own process's rows)."""
    folder, go = tmp_path / "ov", tmp_path / "go"
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, str(script), str(folder), who, str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for who in "AB"]
    import time

    deadline = time.monotonic() + 120
    while not all(go.with_name(go.name + w).exists() for w in "AB"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()                                                                   # both start together
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    final = load_overlay(folder)
    assert len(final.examples()) == 12 and final.num_rows == 12
    assert sorted(set(final.labels)) == ["label A", "label B"]
    assert final.labels.count("label A") == 6
    assert max(int(o.strip()) for o, _ in outs) == 12                          # the last saver holds all rows


def test_undo_by_one_writer_survives_another_writers_save(tmp_path):
    folder = tmp_path / "ov"
    first = Overlay.empty(tiny_base())
    kept, undone = add_one(first, "cup", 1), add_one(first, "cup", 2)
    first.save(folder)
    other = load_overlay(folder)                                                 # a second writer
    me = load_overlay(folder)
    me.remove(undone)
    me.save()
    add_one(other, "mug", 3)
    other.save()                                                                 # must not resurrect `undone`
    final = load_overlay(folder)
    ids = {e["example_id"] for e in final.examples()}
    assert undone not in ids and kept in ids and len(ids) == 2
    assert set(final.labels) == {"cup", "mug"}
    assert other.num_rows == final.num_rows                                      # the saver holds the merge


def test_tampered_overlay_names_the_overlay_fix_not_a_rebuild(tmp_path):
    """A changed overlay file says to restore it or add the examples again; an overlay is not
    'rebuilt' with build-reference (issue 22)."""
    import pytest

    from reme.errors import ReferenceSetError

    ov = Overlay.empty(tiny_base())
    add_one(ov, "cup", 1)
    folder = ov.save(tmp_path / "ov")
    for name in ("S_ref.npy", "labels.parquet", "examples.parquet"):
        f = folder / name
        good = f.read_bytes()
        f.write_bytes(good[:-8] + bytes(8))
        with pytest.raises(ReferenceSetError, match=f"{name}.*add the examples again") as exc:
            load_overlay(folder)
        assert "rebuild" not in str(exc.value)
        f.write_bytes(good)
    load_overlay(folder)
