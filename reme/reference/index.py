"""FAISS index over S_ref (docs/method.md step 10) for top-k retrieval.

The index only proposes candidate neighbours; [`reme.inference.retrieval.rescore`][reme.inference.retrieval.rescore]
recomputes their inner products exactly from S_ref, so a compressed index changes which candidates
are found, never their weights.

Index type by reference-set size m ([`choose_index_kind`][reme.reference.index.choose_index_kind];
docs/performance.md has the measurements behind the thresholds):

==============  ======================  =====================================================
m               kind                    FAISS factory string
==============  ======================  =====================================================
< 200 000       ``"flat"``              ``IndexFlatIP`` (exact; a GEMM like the exact path)
200 000 - 10M   ``"ivf_sq8"``           ``IVF{nlist},SQ8`` (1 byte per dimension, IVF scan)
> 10M           ``"ivf_pq"``            ``IVF{nlist},PQ{d/16}`` (d/16 bytes per vector)
==============  ======================  =====================================================

``"ivf_flat"`` (``IVF{nlist},Flat``, 4 bytes per dimension) is available too. IVF indexes are
trained on a random sample of S_ref (`IVF_TRAIN_PER_LIST` rows per list) and the rows are
added in float32 blocks, so building never holds a float32 copy of S_ref.

Every dense product (assigning rows to lists, choosing the lists a query probes, and
the whole search of a flat index) runs as a torch GEMM; FAISS only stores and scans the
inverted lists. Measured on the 2-core test machine, the BLAS bundled with the faiss-cpu wheel
took 5-9 s for a 256 x 100k x 1024 flat search that torch does in 1.2 s
(docs/performance.md). [`search`][reme.reference.index.search] takes care of this; ``index.search`` works too,
slower.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Below this many reference segments the index is exact (``IndexFlatIP``); chosen by us
#: (issue 5): a flat search costs one GEMM, like the exact path, which is fast enough here.
FLAT_MAX_SEGMENTS = 200_000
#: Above this many the inverted lists are product-quantised (memory d/16 bytes per vector).
IVF_PQ_MIN_SEGMENTS = 10_000_000
#: Training rows per inverted list (k-means on a sample; FAISS suggests 30-256).
IVF_TRAIN_PER_LIST = 32
#: Lists probed per query by default; chosen by us from scripts/bench_faiss_recall.py on real
#: segment embeddings (DINOv2 ViT-S/14, 21,403 Felzenszwalb segments of coco_tiny and CamVid
#: train photos tiled with noise to 1e6 rows, IVF-SQ8 with 2048 lists, 1000 query segments of
#: val photos): recall@10 against the exact top-10 (32 candidates) was 0.79 at nprobe 4 (the
#: earlier default, tuned on synthetic clusters), 0.96 at 16 and 0.99 at 32 with copies at
#: cosine ~0.89 to their source; with noisier copies (cosine ~0.71) 0.94 at 16 and 0.98 at 32.
#: 32 is the smallest setting with recall@10 >= 0.95 in both (docs/performance.md).
DEFAULT_NPROBE = 32
INDEX_KINDS = ("flat", "ivf_flat", "ivf_sq8", "ivf_pq")


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a core dependency
        raise ImportError("the FAISS index needs faiss: pip install faiss-cpu") from exc
    return faiss


def choose_index_kind(num_segments: int) -> str:
    """Index kind for a reference set of ``num_segments`` rows (module table)."""
    if num_segments < FLAT_MAX_SEGMENTS:
        return "flat"
    return "ivf_sq8" if num_segments <= IVF_PQ_MIN_SEGMENTS else "ivf_pq"


def default_nlist(num_segments: int) -> int:
    """Inverted lists for m rows: the power of two nearest 2 sqrt(m), at least 1 (our choice;
    FAISS guidance is 1-16 sqrt(m)). 1e6 rows -> 2048 lists of ~490 rows."""
    if num_segments < 1:
        return 1
    return max(1, 2 ** int(round(math.log2(2.0 * math.sqrt(num_segments)))))


def _float32_blocks(S_ref, block: int):
    for start in range(0, S_ref.shape[0], block):
        yield np.ascontiguousarray(S_ref[start:start + block], dtype=np.float32)


def _assign(X: torch.Tensor, C: torch.Tensor, block: int = 65536) -> torch.Tensor:
    """Nearest centroid (inner product) of each row: (n,) int64 (a torch GEMM, see the module
    docstring)."""
    return torch.cat([(X[s:s + block] @ C.T).argmax(1) for s in range(0, X.shape[0], block)])


def train_centroids(sample: np.ndarray, nlist: int, *, niter: int = 10, seed: int = 0) -> np.ndarray:
    """IVF list centroids: ``faiss.Kmeans(spherical=True)`` on the training rows, every row used
    (no subsampling, no warning about few points per centroid).

    Args:
        sample: (n, d) float32 L2-normalised training rows.
        nlist: number of lists, clipped to [1, n].
        niter: Lloyd iterations.
        seed: faiss's initialisation seed (deterministic output).

    Returns:
        (nlist, d) float32 unit centroids.

    Raises:
        ValueError: ``sample`` has no rows.
    """
    if len(sample) == 0:
        raise ValueError("k-means needs at least one row")
    n, d = sample.shape
    km = _faiss().Kmeans(d, max(1, min(int(nlist), n)), niter=int(niter), seed=int(seed), spherical=True,
                         min_points_per_centroid=1, max_points_per_centroid=max(n, 1), verbose=False)
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def build_index(S_ref, kind: str = "auto", *, nlist: int | None = None, nprobe: int = DEFAULT_NPROBE,
                train_size: int | None = None, niter: int = 10, block: int = 65536, seed: int = 0):
    """Inner-product FAISS index over S_ref (cosine similarity, since rows are L2-normalised).

    Args:
        S_ref: (m, d) float16/float32 array or memory map, L2-normalised rows.
        kind: one of `INDEX_KINDS`, or "auto" ([`choose_index_kind`][reme.reference.index.choose_index_kind]).
        nlist: inverted lists of an IVF index (default [`default_nlist`][reme.reference.index.default_nlist]).
        nprobe: lists searched per query (stored in the index).
        train_size: k-means training rows (default ``IVF_TRAIN_PER_LIST * nlist``, at most m).
        niter: k-means iterations.
        block: rows converted to float32 and added at a time.
        seed: sampling seed of the training rows.

    Returns:
        A ``faiss.Index`` with m vectors.

    Raises:
        ValueError: unknown ``kind`` or S_ref not 2-D.
    """
    faiss = _faiss()
    if getattr(S_ref, "ndim", 0) != 2:
        raise ValueError(f"S_ref must be (m, d), got shape {getattr(S_ref, 'shape', None)}")
    m, d = int(S_ref.shape[0]), int(S_ref.shape[1])
    kind = choose_index_kind(m) if kind == "auto" else kind
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; known: {INDEX_KINDS} or 'auto'")
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        for X in _float32_blocks(S_ref, block):
            index.add(X)
        return index
    nlist = max(1, min(int(nlist or default_nlist(m)), m))
    n_train = max(nlist, int(train_size or IVF_TRAIN_PER_LIST * nlist))
    n_train = min(m, max(n_train, 40 * 256) if kind == "ivf_pq" else n_train)  # PQ codebooks: 256 codes
    rows = np.sort(np.random.default_rng(seed).choice(m, n_train, replace=False)) if n_train < m else np.arange(m)
    sample = np.ascontiguousarray(S_ref[rows], dtype=np.float32)
    logger.info("k-means of %d lists on %d of %d rows", nlist, n_train, m)
    C = torch.from_numpy(train_centroids(sample, nlist, niter=niter, seed=seed))
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(C.numpy())
    if kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf_sq8":
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        index.by_residual = False                       # codes of the rows themselves: no assignment to train
    else:
        msub = next(s for s in (d // 16, d // 8, d // 4, d // 2, d) if s >= 1 and d % s == 0)
        index = faiss.IndexIVFPQ(quantizer, d, nlist, msub, 8, faiss.METRIC_INNER_PRODUCT)
        index.by_residual = False
    index.own_fields = True
    quantizer.this.disown()                             # the IVF index owns (and frees) its quantizer
    index.train(sample)                                 # quantizer is trained: only the codec trains
    index.nprobe = int(nprobe)
    from faiss.contrib.ivf_tools import add_preassigned

    for X in _float32_blocks(S_ref, block):            # lists chosen by a torch GEMM, stored by faiss
        add_preassigned(index, X, np.ascontiguousarray(_assign(torch.from_numpy(X), C).numpy(), dtype=np.int64))
    return index


def describe_index(index) -> dict:
    """``{"kind", "nlist", "nprobe", "ntotal", "dim"}`` of an index (for the manifest)."""
    faiss = _faiss()
    info = {"ntotal": int(index.ntotal), "dim": int(index.d), "kind": "flat", "nlist": None, "nprobe": None}
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return info
    codec = type(index).__name__
    info.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe),
                kind={"IndexIVFFlat": "ivf_flat", "IndexIVFScalarQuantizer": "ivf_sq8",
                      "IndexIVFPQ": "ivf_pq"}.get(codec, codec))
    return info


def set_nprobe(index, nprobe: int) -> None:
    """Lists searched per query of an IVF index (no effect on a flat index)."""
    if int(nprobe) < 1:
        raise ValueError(f"nprobe must be >= 1, got {nprobe}")
    try:
        _faiss().extract_index_ivf(index).nprobe = int(nprobe)
    except RuntimeError:
        pass


def to_gpu(index):
    """The index on all GPUs when this faiss build has any (logged), else unchanged."""
    faiss = _faiss()
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if ngpu < 1:
        logger.debug("faiss: no GPU, searching on the CPU")
        return index
    logger.info("faiss: moving the index to %d GPU(s)", ngpu)
    return faiss.index_cpu_to_all_gpus(index)


def write_index(index, path: str | Path) -> None:
    """Write a FAISS index to ``path``."""
    _faiss().write_index(index, str(path))


def read_index(path: str | Path):
    """Read a FAISS index from ``path``."""
    return _faiss().read_index(str(path))


_CENTROID_CACHE: list[tuple[object, torch.Tensor]] = []


def _centroids(index) -> torch.Tensor:
    """(nlist, d) float32 tensor of an IVF index's list centroids (cached for 4 indexes)."""
    for obj, C in _CENTROID_CACHE:
        if obj is index:
            return C
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    C = torch.from_numpy(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    _CENTROID_CACHE.insert(0, (index, C))
    del _CENTROID_CACHE[4:]
    return C


def search(index, queries, k: int, *, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours.

    A flat CPU index is searched exactly with a torch GEMM over its stored vectors; an IVF CPU
    index gets its probed lists from a torch GEMM against the centroids and FAISS scans them
    (``search_preassigned``); a GPU index uses ``index.search``.

    Args:
        index: a FAISS index over S_ref.
        queries: (q, d) float32, L2-normalised.
        k: neighbours per query.
        nprobe: lists probed per query (IVF only; default: the index's ``nprobe``).

    Returns:
        ``(D, I)``: (q, k) float32 inner products (approximate for IVF-SQ8/PQ; re-score them
        with [`reme.inference.retrieval.rescore`][reme.inference.retrieval.rescore]) and (q, k) int64 ids, -1 where
        fewer than k reference rows were found (faiss convention).
    """
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    faiss = _faiss()
    k = int(k)
    Q = np.ascontiguousarray(queries, dtype=np.float32)
    if Q.ndim != 2 or Q.shape[1] != index.d:
        raise ValueError(f"queries must be (q, {index.d}), got shape {Q.shape}")
    if type(index).__name__.startswith("Gpu"):
        return index.search(Q, k)
    if isinstance(index, faiss.IndexFlat):
        from reme.inference.retrieval import exact_topk

        xb = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
        D = np.full((Q.shape[0], k), -np.inf, np.float32)
        I = np.full((Q.shape[0], k), -1, np.int64)
        if index.ntotal and Q.shape[0]:
            v, i = exact_topk(torch.from_numpy(Q), xb, k)
            D[:, :v.shape[1]], I[:, :i.shape[1]] = v.numpy(), i.numpy()
        return D, I
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return index.search(Q, k)
    probe = int(nprobe or ivf.nprobe)
    probe = max(1, min(probe, ivf.nlist))
    Dq, Iq = torch.topk(torch.from_numpy(Q) @ _centroids(index).T, probe, dim=1)
    Iq = np.ascontiguousarray(Iq.numpy(), dtype=np.int64)
    Dq = np.ascontiguousarray(Dq.numpy(), dtype=np.float32)
    D = np.empty((Q.shape[0], k), np.float32)
    I = np.empty((Q.shape[0], k), np.int64)
    params = faiss.SearchParametersIVF(nprobe=probe)
    ivf.search_preassigned_c(Q.shape[0], faiss.swig_ptr(Q), k, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq),
                             faiss.swig_ptr(D), faiss.swig_ptr(I), False, params)
    return D, I
