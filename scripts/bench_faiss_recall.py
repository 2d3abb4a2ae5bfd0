"""Recall@10 of the FAISS top-k path against the exact top-k on real segment embeddings (issue 13).

Rows (the reference side): the S_ref rows of the references given by ``--base-reference``
(segment embeddings of their build photos), plus segment embeddings of the photos in
``--images``, computed exactly as :meth:`reme.Segmenter.segment_scores` computes S_test (the
``--reference``'s visual encoder and proposals, mask-average pooled, L2-normalised). To reach ``--rows`` rows the B base rows are tiled:
copy 0 is the base itself, copy j >= 1 is ``normalise(x + sigma * g / sqrt(d))`` with
g ~ N(0, I_d) drawn per row (seed j), so a copy's cosine to its source is about
``1 / sqrt(1 + sigma^2)`` (sigma 0.5 -> 0.89). Queries: segment embeddings of other photos
(``--query-images``), ``--queries`` of them sampled at random (seed 0).

For each nprobe the index (kind and nlist by size: :func:`reme.reference.index.choose_index_kind`,
:func:`reme.reference.index.default_nlist`) is searched once for the largest candidate count K; the
candidates of a smaller K are the first K of that list (one IVF scan, sorted by approximate
score). ``recall@10`` is the mean share of a query's exact top-10 rows
(:func:`reme.inference.retrieval.exact_topk`) found among its K candidates: after the exact re-scoring
of :func:`reme.inference.retrieval.rescore`, these are the neighbours the top-k path gets right.
``ms/query`` is the FAISS search time of K = max divided by the number of queries.

Embeddings are cached in ``--cache`` (``.npz``) keyed by nothing but the file name: delete it
when the photos or the encoder change.

    python scripts/bench_faiss_recall.py --reference REF [--base-reference REF ...] [--images DIR ...] \\
        --query-images DIR [DIR ...] [--rows 1000000] [--sigma 0.5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reme.reference.index import DEFAULT_NPROBE, build_index, choose_index_kind, describe_index, search  # noqa: E402
from reme.inference.retrieval import DEFAULT_TOPK_CANDIDATES, exact_topk  # noqa: E402

IMAGE_EXT = (".jpg", ".jpeg", ".png")


def list_images(folders, limit: int | None) -> list[Path]:
    """Sorted image paths of each folder (first ``limit`` per folder)."""
    out = []
    for f in folders:
        files = sorted(p for p in Path(f).iterdir() if p.suffix.lower() in IMAGE_EXT)
        out += files[:limit] if limit else files
    return out


def segment_embeddings(segmenter, paths) -> np.ndarray:
    """(n, d) float32 S_test rows of all photos (Segmenter's own encoder and proposals)."""
    rows = []
    for i, p in enumerate(paths):
        S = segmenter.segment_scores(str(p), "thing", return_embeddings=True)[3]
        rows.append(S.float().cpu().numpy())
        print(f"  {i + 1}/{len(paths)} {p.name}: {S.shape[0]} segments", file=sys.stderr, flush=True)
    return np.concatenate(rows).astype(np.float32)


def tile_rows(base: np.ndarray, rows: int, sigma: float) -> np.ndarray:
    """(rows, d) float32: the base rows, then noisy re-normalised copies (module docstring)."""
    n, d = base.shape
    out = np.empty((rows, d), np.float32)
    done = 0
    j = 0
    while done < rows:
        take = min(n, rows - done)
        if j == 0:
            block = base[:take]
        else:
            g = np.random.default_rng(j).standard_normal((take, d), dtype=np.float32)
            block = base[:take] + (sigma / np.sqrt(d)) * g
            block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[done:done + take] = block
        done += take
        j += 1
    return out


def recall_table(S_ref: np.ndarray, Q: np.ndarray, nprobes, candidates, k: int = 10, index=None) -> list[dict]:
    """One row per (nprobe, K): recall@k of the K FAISS candidates and ms per query."""
    index = index if index is not None else build_index(S_ref)
    _, true_ids = exact_topk(torch.from_numpy(Q), S_ref, k)
    true_ids = true_ids.numpy()
    kmax = max(candidates)
    out = []
    for npb in nprobes:
        t0 = time.perf_counter()
        _, I = search(index, Q, kmax, nprobe=npb)
        ms = 1000 * (time.perf_counter() - t0) / len(Q)
        for K in candidates:
            hit = [len(set(true_ids[i]) & set(I[i, :K].tolist())) / k for i in range(len(Q))]
            out.append({"nprobe": npb, "candidates": K, "recall": float(np.mean(hit)),
                        "min_recall": float(np.min(hit)), "ms_per_query": ms})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="reference folder (encoder and proposal settings)")
    ap.add_argument("--base-reference", nargs="*", default=[], help="references whose S_ref rows are base rows")
    ap.add_argument("--images", nargs="*", default=[], help="folders of base photos")
    ap.add_argument("--query-images", nargs="+", required=True, help="folders of query photos")
    ap.add_argument("--limit", type=int, default=None, help="photos per base folder")
    ap.add_argument("--query-limit", type=int, default=10, help="photos per query folder")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--candidates", type=int, nargs="+", default=[10, 32, 64, 128, 256])
    ap.add_argument("--cache", default="faiss_recall_embeddings.npz")
    args = ap.parse_args(argv)

    cache = Path(args.cache)
    if cache.exists():
        z = np.load(cache)
        base, Qall = z["base"], z["queries"]
    else:
        from reme import Segmenter

        seg = Segmenter(args.reference, device="cpu")
        t0 = time.perf_counter()
        from reme.reference import load_reference

        parts = [np.asarray(load_reference(r).S_ref, dtype=np.float32) for r in args.base_reference]
        if args.images:
            parts.append(segment_embeddings(seg, list_images(args.images, args.limit)))
        base = np.concatenate(parts)
        base /= np.linalg.norm(base, axis=1, keepdims=True)        # float16 S_ref rows -> unit float32
        Qall = segment_embeddings(seg, list_images(args.query_images, args.query_limit))
        print(f"embedded in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        np.savez(cache, base=base, queries=Qall)
    rng = np.random.default_rng(0)
    Q = Qall[rng.choice(len(Qall), size=min(args.queries, len(Qall)), replace=False)]
    S_ref = tile_rows(base, args.rows, args.sigma)
    t0 = time.perf_counter()
    index = build_index(S_ref)
    info = describe_index(index)
    print(f"base rows {len(base)}, query rows {len(Qall)} (sampled {len(Q)}), tiled to {len(S_ref)} "
          f"(sigma {args.sigma}); index {info['kind']} nlist {info['nlist']} ({choose_index_kind(len(S_ref))}), "
          f"built in {time.perf_counter() - t0:.0f} s; defaults nprobe {DEFAULT_NPROBE}, "
          f"candidates {DEFAULT_TOPK_CANDIDATES}")
    rows = recall_table(S_ref, Q, args.nprobe, args.candidates, index=index)
    print("| nprobe | candidates | recall@10 | min recall@10 | ms / query |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['nprobe']} | {r['candidates']} | {r['recall']:.3f} | {r['min_recall']:.1f} | "
              f"{r['ms_per_query']:.2f} |")


if __name__ == "__main__":
    main()
