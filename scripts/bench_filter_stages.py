"""Time and peak memory of the global build stages 7-10 on synthetic pairs (issue 13).

Runs :func:`reme.build._global_stages.caption_global_stages`, the build's own code (group-median
filter, knee filter, synonyms, assembly of {S_ref, O_ref, L_ref}), on ``--pairs`` synthetic
pairs over ``--roots`` root nouns with Zipf(1.1) group sizes, ``--pairs // 2`` segments of
dimension ``--dim`` held in memory (:class:`reme.build._global_stages.ArrayReader`), labels of the
form "<modifier> <root>" (about ``--labels`` distinct) and a weight-free hashing text
encoder (so the time is the stages', not a network's). One row per ``--pairs`` value;
``peak_rss_mib`` is the process's peak resident memory after that row (monotone over rows;
run one size per process to see each size's own peak).

    python scripts/bench_filter_stages.py --pairs 250000 500000 1000000 --roots 50000
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import zlib

import numpy as np

from reme.build.pipeline import CaptionBuildParams
from reme.build._global_stages import ArrayReader, caption_global_stages

MODIFIERS = ("a", "a small", "a large", "the red", "a white", "the old", "a black", "two")


class HashText:
    """Weight-free text encoder: row ``crc32(text) % 65536`` of a fixed random unit table."""

    spec = "hash-text"

    def __init__(self, dim: int = 32):
        self.dim = dim
        t = np.random.default_rng(0).standard_normal((1 << 16, dim)).astype(np.float32)
        self.table = t / np.linalg.norm(t, axis=1, keepdims=True)

    def encode(self, texts):
        return self.table[np.fromiter((zlib.crc32(t.encode()) & 0xFFFF for t in texts), np.int64, len(texts))]


def synthetic(pairs: int, roots: int, dim: int, seed: int = 0) -> ArrayReader:
    rng = np.random.default_rng(seed)
    w = np.arange(1, roots + 1, dtype=np.float64) ** -1.1
    root_of = rng.choice(roots, size=pairs, p=w / w.sum())
    m = max(pairs // 2, 1)
    seg = rng.integers(0, m, pairs)
    S = rng.standard_normal((m, dim)).astype(np.float32)          # segment embeddings (random directions)
    S /= np.linalg.norm(S, axis=1, keepdims=True)
    names = np.array([f"root{i}" for i in range(roots)], dtype=object)
    mods = np.array(MODIFIERS, dtype=object)[rng.integers(0, len(MODIFIERS), pairs)]
    root_txt = names[root_of]
    labels = [f"{a} {b}" for a, b in zip(mods.tolist(), root_txt.tolist())]
    return ArrayReader(S, seg, labels, root_txt.tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, nargs="+", default=[250_000, 500_000, 1_000_000])
    ap.add_argument("--roots", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=64, help="visual embedding size d")
    ap.add_argument("--k-sim", type=int, default=30)
    args = ap.parse_args()
    rows = []
    for p in args.pairs:
        reader = synthetic(p, args.roots, args.dim)
        params = CaptionBuildParams(k_sim=args.k_sim)
        t0 = time.perf_counter()
        ref, info, _ = caption_global_stages(reader, params, HashText(), ("{}",), budget_rows=1_000_000)
        sec = time.perf_counter() - t0
        row = {"pairs": p, "roots": args.roots, "dim": args.dim, "seconds": round(sec, 1),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "pairs_after_group_filter": info["pairs_after_group_filter"],
               "pairs_after_knee_filter": info["pairs_after_knee_filter"],
               "pairs_after_synonyms": info["pairs_after_synonyms"], "labels": ref.num_labels}
        print(json.dumps(row), flush=True)
        rows.append(row)


if __name__ == "__main__":
    main()
