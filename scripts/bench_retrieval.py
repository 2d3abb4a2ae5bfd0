"""Benchmark eq. 1 at scale: bare GEMM vs exact streamed softmax vs FAISS top-k (issue 5).

Synthetic, clustered reference sets (N x d float16, written to a raw ``.npy`` file and
memory-mapped, as :func:`reme.reference.load_reference` does): N / 500 random "topics" on the
unit sphere, each with 3 home labels, split into sub-clusters of ~25 segments (a sub-cluster
centre is its topic plus Gaussian noise, cosine ~0.8 to it; a segment is its sub-cluster
centre plus noise, cosine ~0.9). A segment's first label is its sub-cluster's home label
(70 %), another home label of its topic (15 %) or any of the n labels (15 %); 30 % of segments
get a second home label. k = 256 test segments drawn like reference segments (fresh noise). Three class lists
(c = 21, 59, 150, like VOC, PASCAL-Context and ADE) give three A2 matrices; both paths compute
A1 once and P_seg = A1 A2 for each.

Timed in one process and run, per N (best of ``--repeat``):

* ``gemm``: the bare ``S_test @ S_ref.T`` on an in-memory float32 copy (k x N output);
* ``exact``: :func:`reme.inference.retrieval.streamed_label_affinity` on the float16 memory map, plus the
  three A1 A2 products (softmax over all N segments, logit scale ``--tau``);
* ``topk``: FAISS search of ``--candidates`` neighbours (index kind by size,
  :func:`reme.reference.index.choose_index_kind`), exact re-scoring, softmax over the candidates, A1 A2.

``argmax_agreement`` is the share of (test segment, class list) whose P_seg argmax is the same
in both paths. ``peak_extra_mb`` is the peak resident memory of the exact run beyond what the
process held before it with S_ref already paged in (Linux VmHWM reset through
/proc/self/clear_refs; ru_maxrss where that is unavailable).

The last line printed is one JSON object for the largest N run. ``--quick`` runs N = 1e5 only.

    python scripts/bench_retrieval.py [--quick] [--sizes 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reme.reference.index import DEFAULT_NPROBE, build_index, choose_index_kind, describe_index, search, set_nprobe
from reme.inference.retrieval import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TOPK_CANDIDATES,
    label_affinity,
    rescore,
    streamed_label_affinity,
    topk_class_scores,
)
from reme.reference.oref import o_ref_csr

CLASS_LISTS = (21, 59, 150)


def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def reset_peak() -> bool:
    """Reset the peak-RSS mark (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    hwm = _status_kb("VmHWM")
    if hwm is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return hwm / 1024.0


def rss_mb() -> float:
    rss = _status_kb("VmRSS")
    return (rss or 0) / 1024.0


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_reference(path: Path, n: int, d: int, n_labels: int, seed: int, block: int = 65536):
    """Write a clustered float16 S_ref to ``path`` (.npy); return (sub-cluster centres, O_ref pairs).

    Two-level clusters: N / 500 topics (3 home labels each), each split into sub-clusters of
    ~25 segments (one dominant home label each). Cosines: same sub-cluster ~0.8, same topic ~0.55,
    unrelated ~0.
    """
    rng = np.random.default_rng(seed)
    n_topics = max(2, n // 500)
    n_sub = max(2, n // 25)
    topics = unit(rng.standard_normal((n_topics, d), dtype=np.float32))
    home = rng.integers(0, n_labels, (n_topics, 3))
    sub_topic = rng.integers(0, n_topics, n_sub)
    subs = unit(topics[sub_topic] + (0.8 / np.sqrt(d)) * rng.standard_normal((n_sub, d), dtype=np.float32))
    sub_label = home[sub_topic, rng.integers(0, 3, n_sub)]
    S = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    sub = rng.integers(0, n_sub, n)
    for s in range(0, n, block):
        c = sub[s:s + block]
        S[s:s + c.size] = unit(subs[c] + (NOISE / np.sqrt(d)) * rng.standard_normal((c.size, d), dtype=np.float32))
    S.flush()
    del S
    u = rng.random(n)
    first = np.where(u < 0.7, sub_label[sub],
                     np.where(u < 0.85, home[sub_topic[sub], rng.integers(0, 3, n)], rng.integers(0, n_labels, n)))
    two = np.nonzero(rng.random(n) < 0.3)[0]
    second = home[sub_topic[sub[two]], rng.integers(0, 3, two.size)]
    keep = second != first[two]                                                # O_ref is binary
    ps = np.concatenate([np.arange(n), two[keep]])
    pl = np.concatenate([first, second[keep]])
    return subs, ps, pl


NOISE = 0.5


def make_queries(centres: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    d = centres.shape[1]
    c = rng.integers(0, centres.shape[0], k)
    return unit(centres[c] + (NOISE / np.sqrt(d)) * rng.standard_normal((k, d), dtype=np.float32)).astype(np.float32)


def best_of(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def run_size(n: int, args, workdir: Path) -> dict:
    d, k = args.dim, args.k
    t0 = time.perf_counter()
    path = workdir / f"S_ref_{n}.npy"
    centres, ps, pl = make_reference(path, n, d, args.labels, args.seed)
    S_ref = np.load(path, mmap_mode="r")
    St = torch.from_numpy(make_queries(centres, k, args.seed))
    rng = np.random.default_rng(args.seed + 2)
    L_ref = unit(rng.standard_normal((args.labels, 384), dtype=np.float32))
    A2s = [label_affinity(L_ref, unit(rng.standard_normal((c, 384), dtype=np.float32)), args.tau2) for c in CLASS_LISTS]
    csr = o_ref_csr(ps, pl, n, args.labels)
    gen_s = time.perf_counter() - t0
    print(f"N={n}: generated {n} x {d} float16 ({path.stat().st_size / 2**20:.0f} MiB) in {gen_s:.1f} s", flush=True)

    def exact():
        A1 = streamed_label_affinity(St, S_ref, csr, logit_scale=args.tau, chunk_size=args.chunk_size)
        return [A1 @ A2 for A2 in A2s]

    exact()                                                                    # pages S_ref in
    gc.collect()
    resettable = reset_peak()
    base = rss_mb() if resettable else peak_mb()
    t_exact, P_exact = best_of(exact, 1)
    peak_extra = peak_mb() - base
    t_exact2, _ = best_of(exact, max(0, args.repeat - 1)) if args.repeat > 1 else (t_exact, None)
    t_exact = min(t_exact, t_exact2)

    S32 = torch.from_numpy(np.asarray(S_ref, dtype=np.float32))
    t_gemm, _ = best_of(lambda: St @ S32.T, args.repeat)
    S32 = _ = None                                                            # free the float32 copy
    gc.collect()

    kind = args.index_kind if args.index_kind != "auto" else choose_index_kind(n)
    t0 = time.perf_counter()
    index = build_index(S_ref, kind, nprobe=args.nprobe)
    t_build = time.perf_counter() - t0
    info = describe_index(index)
    print(f"N={n}: built {info} in {t_build:.1f} s", flush=True)

    A2_all = torch.cat(A2s, 1)
    splits = list(CLASS_LISTS)

    def topk(K=args.candidates):
        _, I = search(index, St.numpy(), K)
        P = topk_class_scores(rescore(St, S_ref, I), I, csr, A2_all, logit_scale=args.tau)
        return list(torch.split(P, splits, dim=1))

    topk()
    t_topk, P_topk = best_of(topk, args.repeat)
    agree = float(np.mean([(a.argmax(1) == b.argmax(1)).float().mean().item() for a, b in zip(P_exact, P_topk)]))

    sweep = []
    if args.sweep and info["nlist"]:
        for nprobe in (4, 8, 16, 32):
            set_nprobe(index, nprobe)
            for K in (32, 64, 128, 256):
                t, P = best_of(lambda: topk(K), args.repeat)
                ag = float(np.mean([(a.argmax(1) == b.argmax(1)).float().mean().item() for a, b in zip(P_exact, P)]))
                sweep.append({"nprobe": nprobe, "candidates": K, "topk_s": round(t, 4), "speedup": round(t_exact / t, 1),
                              "argmax_agreement": round(ag, 4)})
                print(f"  sweep nprobe={nprobe} K={K}: {t * 1e3:.1f} ms, speedup {t_exact / t:.1f}, agreement {ag:.4f}", flush=True)
        set_nprobe(index, args.nprobe)
    index = None
    gc.collect()
    res = {"n": n, "d": d, "k": k, "labels": args.labels, "class_lists": list(CLASS_LISTS), "tau": args.tau,
           "gemm_s": round(t_gemm, 4), "exact_s": round(t_exact, 4), "topk_s": round(t_topk, 4),
           "exact_over_gemm": round(t_exact / t_gemm, 3), "topk_speedup_over_exact": round(t_exact / t_topk, 1),
           "argmax_agreement": round(agree, 4), "peak_extra_mb": round(peak_extra, 1),
           "s_ref_mb": round(path.stat().st_size / 2**20, 1), "index": info, "index_build_s": round(t_build, 1),
           "candidates": args.candidates, "chunk_size": args.chunk_size, "threads": torch.get_num_threads(),
           "peak_measure": "VmHWM reset" if resettable else "ru_maxrss (not resettable)",
           "loadavg_1min": round(os.getloadavg()[0], 2)}
    if sweep:
        res["sweep"] = sweep
    path.unlink()
    print(f"N={n}: gemm {t_gemm:.3f} s, exact {t_exact:.3f} s ({t_exact / t_gemm:.2f}x gemm), "
          f"top-k {t_topk * 1e3:.1f} ms ({t_exact / t_topk:.1f}x faster), agreement {agree:.4f}, "
          f"peak extra {peak_extra:.0f} MB", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--quick", action="store_true", help="N = 1e5 only (< 60 s)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--k", type=int, default=256, help="test segments")
    ap.add_argument("--labels", type=int, default=10_000, help="reference labels n")
    ap.add_argument("--tau", type=float, default=50.0, help="logit scale of eq. 1 (Segmenter default)")
    ap.add_argument("--tau2", type=float, default=50.0, help="logit scale of eq. 2")
    ap.add_argument("--candidates", type=int, default=DEFAULT_TOPK_CANDIDATES, help="top-k neighbours searched")
    ap.add_argument("--index-kind", default="auto")
    ap.add_argument("--nprobe", type=int, default=DEFAULT_NPROBE)
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sweep", action="store_true", help="also sweep nprobe x candidates at each IVF size")
    ap.add_argument("--workdir", type=Path, default=None, help="where the float16 S_ref files go (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [100_000] if args.quick else sorted(args.sizes)
    if args.quick:
        args.repeat = 1                                                        # stay under a minute
    workdir = Path(tempfile.mkdtemp(prefix="reme-bench-", dir=args.workdir))
    t0 = time.perf_counter()
    try:
        results = [run_size(n, args, workdir) for n in sizes]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"total {time.perf_counter() - t0:.1f} s, threads {torch.get_num_threads()}, cpus {os.cpu_count()}", flush=True)
    for r in results[:-1]:
        print(json.dumps(r))
    last = results[-1]
    keys = ("n", "exact_over_gemm", "topk_speedup_over_exact", "argmax_agreement", "peak_extra_mb")
    print(json.dumps({**{k: last[k] for k in keys}, **{k: v for k, v in last.items() if k not in keys}}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
