"""Retrieval-based inference, docs/method.md Part 2, eqs. 1-3.

    A1    = softmax(tau1 * S_test S_ref^T, axis=1) O_ref     (k x n)   eq. 1
    A2    = softmax(tau2 * L_ref L_test^T, axis=1)           (n x c)   eq. 2
    P_seg = A1 A2                                            (k x c)
    P_test[x, y, j] = sum_i P_seg[i, j] M_seg[i, x, y]       (h x w x c) eq. 3

``tau1`` / ``tau2`` are the logit scales (inverse temperatures) of the two softmaxes; the
notes give none, so the literal paper form is ``tau = 1`` and ``top_k = None``.

How reme computes them at scale (m up to millions of reference segments; docs/performance.md
has the measurements):

* **Exact eq. 1** streams S_ref in blocks of ``chunk_size`` rows with an online log-sum-exp,
  so the k x m similarity matrix is never materialised. Each block is converted from its stored
  dtype (float16 on disk, possibly a memory map) into one reused float32 buffer, multiplied by
  the test embeddings with one GEMM (the softmax shift is folded into that GEMM as an extra
  column), exponentiated in place and folded into the accumulator: A1 with O_ref kept sparse
  ([`streamed_label_affinity`][reme.inference.retrieval.streamed_label_affinity], O(k n) memory) or P_seg
  directly with a dense B = O_ref A2 ([`segment_class_scores`][reme.inference.retrieval.segment_class_scores],
  O(m c) memory).
* **Top-k eq. 1** restricts the softmax to each test segment's nearest reference segments,
  found exactly ([`exact_topk`][reme.inference.retrieval.exact_topk]) or by a FAISS index
  ([`reme.reference.index`][reme.reference.index]), whose candidates are re-scored exactly against S_ref
  ([`rescore`][reme.inference.retrieval.rescore]) before the softmax
  ([`topk_label_affinity`][reme.inference.retrieval.topk_label_affinity]). With k = m candidates it equals the
  exact eq. 1.
* **Eq. 3** is a gather ``P_seg[segment_ids]`` for a partition
  ([`pixel_class_scores`][reme.inference.retrieval.pixel_class_scores]) and a sparse product for overlapping
  masks ([`pixel_class_scores_masks`][reme.inference.retrieval.pixel_class_scores_masks]); memory O(H W c).

[`segment_label_affinity`][reme.inference.retrieval.segment_label_affinity] materialises A1 directly, for
inspection and tests.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from reme.reference.oref import ORefCSR, o_ref_csr
from reme.inference.kernel import (
    DEFAULT_CHUNK_SIZE,
    SoftmaxReducer,
    TopkReducer,
    as_tensor,
    as_view,
    candidate_a1_parts,
    candidate_class_scores,
    check_pair,
    resolve_device,
    scan,
)

logger = logging.getLogger(__name__)

#: Candidate neighbours of the top-k path when the softmax itself is not restricted (top_k
#: None): chosen by us. Synthetic clusters (scripts/bench_retrieval.py --sweep, N = 1e6): 32-256
#: all kept argmax agreement 1.0, re-scoring k x 32 cost ~0.05 s against ~0.4 s for k x 256.
#: Real DINOv2 segment embeddings (scripts/bench_faiss_recall.py, 1e6 rows, IVF-SQ8): at
#: nprobe 32, recall@10 was 0.970 with 10 candidates and 0.986 with 32, 64, 128 or 256 alike
#: (32 absorbs the SQ8 ranking error; more only costs time). docs/performance.md.
DEFAULT_TOPK_CANDIDATES = 32



def _check_dims(a: torch.Tensor, b: torch.Tensor, an: str, bn: str) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{an} and {bn} must be (., d) with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")


def label_affinity(L_ref, L_test, logit_scale: float = 1.0, device=None) -> torch.Tensor:
    """A2 = softmax(logit_scale * L_ref L_test^T, axis=1), eq. 2.

    Args:
        L_ref: (n, d2) float, L2-normalised reference label embeddings.
        L_test: (c, d2) float, L2-normalised test class embeddings.
        logit_scale: tau2 (1 = literal paper form).

    Returns:
        (n, c) float32 tensor; each row sums to 1.

    Raises:
        ValueError: L_ref and L_test are not (., d2) with the same d2.

    Examples:
        >>> A2 = label_affinity(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), logit_scale=10.0)
        >>> [round(x, 4) for x in A2[0].tolist()]
        [1.0, 0.0]
    """
    device = device or (L_ref.device if isinstance(L_ref, torch.Tensor) else "cpu")
    Lr, Lt = as_tensor(L_ref, device), as_tensor(L_test, device)
    _check_dims(Lr, Lt, "L_ref", "L_test")
    return torch.softmax(logit_scale * (Lr @ Lt.T), dim=1)


def merge_synonyms(P: torch.Tensor, owner: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Merge the columns of one class's synonyms by max: (k, c') scores -> (k, C).

    Args:
        P: (k, c') float tensor, one column per class string (eq. 2 runs over all of them).
        owner: (c',) int64 tensor, the class index in [0, C) of each column.
        num_classes: C.

    Returns:
        (k, C) tensor of P's dtype; -inf in a class with no column.

    Raises:
        RuntimeError: ``owner`` does not have c' entries (from torch).

    Examples:
        >>> merge_synonyms(torch.tensor([[0.2, 0.5, 0.3]]), torch.tensor([0, 1, 0]), 2).tolist()
        [[0.30000001192092896, 0.5]]
    """
    merged = torch.full((P.shape[0], num_classes), -float("inf"), device=P.device, dtype=P.dtype)
    return merged.scatter_reduce(1, owner.to(P.device).expand(P.shape[0], -1), P, reduce="amax")


def reference_class_scores(pair_segment, pair_label, A2: torch.Tensor, num_segments: int) -> torch.Tensor:
    """B = O_ref A2: (m, c) float32, row i = sum of A2 rows of the labels of segment i."""
    ps = as_tensor(pair_segment, A2.device, torch.int64)
    pl = as_tensor(pair_label, A2.device, torch.int64)
    B = torch.zeros(num_segments, A2.shape[1], device=A2.device, dtype=torch.float32)
    return B.index_add_(0, ps, A2[pl])


# --------------------------------------------------------------------------- streamed eq. 1


def a1_reducer(o_ref: ORefCSR, k: int, device: torch.device, logit_scale: float) -> SoftmaxReducer:
    """The [`SoftmaxReducer`][reme.inference.kernel.SoftmaxReducer] of exact eq. 1 with a sparse
    O_ref: each block E adds O_ref[block]^T E to A1^T (n x k); ``finish().T`` is A1 (k x n).

    Args:
        o_ref: [`ORefCSR`][reme.reference.oref.ORefCSR] (m rows).
        k: test segments; device: where A1 lives; logit_scale: tau1.

    Returns:
        A reducer for [`reme.inference.kernel.scan`][reme.inference.kernel.scan].
    """
    n, device = o_ref.num_labels, torch.device(device)
    acc = torch.zeros(n, k, device=device)                                   # A1^T
    ptr, lab = o_ref.ptr, o_ref.label
    if device.type == "cpu":
        import scipy.sparse as sp

        ones = np.ones(lab.size, np.float32)
        acc_np = acc.numpy()

        def add_block(s, t, e):                                              # A1^T += O[s:t]^T E
            a, b = ptr[s], ptr[t]
            Ot = sp.csc_matrix((ones[a:b], lab[a:b], ptr[s:t + 1] - a), shape=(n, t - s))
            np.add(acc_np, Ot @ e.numpy(), out=acc_np)
    else:
        lab_t = torch.as_tensor(lab, device=device)
        seg_t = torch.as_tensor(np.repeat(np.arange(o_ref.num_segments), np.diff(ptr)), device=device)

        def add_block(s, t, e):
            a, b = ptr[s], ptr[t]
            acc.index_add_(0, lab_t[a:b], e[seg_t[a:b] - s])

    return SoftmaxReducer(logit_scale, acc, add_block)


def class_score_reducer(B: torch.Tensor, k: int, logit_scale: float) -> SoftmaxReducer:
    """The [`SoftmaxReducer`][reme.inference.kernel.SoftmaxReducer] of eqs. 1-2 fused with a dense
    B = O_ref A2: each block E adds B[block]^T E to P_seg^T (c x k); ``finish().T`` is P_seg.

    Args:
        B: (m, c) float tensor ([`reference_class_scores`][reme.inference.retrieval.reference_class_scores]).
        k: test segments; logit_scale: tau1.

    Returns:
        A reducer for [`reme.inference.kernel.scan`][reme.inference.kernel.scan].
    """
    Bf = B.float()
    acc = torch.zeros(B.shape[1], k, device=B.device)                           # P_seg^T

    def add_block(s, t, e):                                                     # P^T += B[s:t]^T E
        acc.addmm_(Bf[s:t].T, e)

    return SoftmaxReducer(logit_scale, acc, add_block)


def streamed_label_affinity(S_test, S_ref, o_ref: ORefCSR, *, logit_scale: float = 1.0,
                            chunk_size: int = DEFAULT_CHUNK_SIZE, device=None) -> torch.Tensor:
    """Exact A1 = softmax(logit_scale * S_test S_ref^T, axis=1) O_ref (eq. 1), streamed.

    S_ref is read block by block (so it may be a float16 memory map) and O_ref stays sparse:
    each block adds O_ref[block]^T E to A1^T with a sparse-dense product.

    Args:
        S_test: (k, d1) float array or tensor, L2-normalised test segment embeddings.
        S_ref: (m, d1) float16/float32 array, memory map or tensor, L2-normalised rows.
        o_ref: O_ref as [`ORefCSR`][reme.reference.oref.ORefCSR]
            ([`o_ref_csr`][reme.reference.oref.o_ref_csr]) with m rows.
        logit_scale: tau1 (1 = literal paper form).
        chunk_size: reference rows per block.
        device: where to compute (default: S_test's device, else CPU).

    Returns:
        (k, n) float32 tensor A1; each row sums to the mean number of labels of the reference
        segments under its softmax (1 when every segment has one label).

    Raises:
        ValueError: dimension mismatch, or O_ref not m rows.

    Examples:
        >>> S_ref = np.eye(3, dtype=np.float16)                      # 3 reference segments
        >>> o = o_ref_csr([0, 1, 2], [0, 0, 1], 3, 2)                 # labels: 0, 0, 1
        >>> A1 = streamed_label_affinity(np.array([[1.0, 0, 0]], np.float32), S_ref, o, logit_scale=100.0,
        ...                              chunk_size=2)
        >>> [round(x, 3) for x in A1[0].tolist()]
        [1.0, 0.0]
    """
    device = resolve_device(S_test, device)
    St = as_tensor(S_test, device)
    check_pair(St, S_ref)
    if o_ref.num_segments != S_ref.shape[0]:
        raise ValueError(f"O_ref has {o_ref.num_segments} rows but S_ref has {S_ref.shape[0]}")
    k, n = St.shape[0], o_ref.num_labels
    if k == 0 or S_ref.shape[0] == 0:
        return torch.zeros(k, n, device=device)
    soft = a1_reducer(o_ref, k, device, logit_scale)
    scan(St, S_ref, [soft], chunk_size=chunk_size, device=device)
    return soft.finish().T


def exact_topk(S_test, S_ref, top_k: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products of each test segment over S_ref, streamed in blocks.

    Args:
        S_test: (k, d1) float; S_ref: (m, d1) float16/float32 array, memory map or tensor.
        top_k: neighbours per test segment (capped at m).
        chunk_size: reference rows per block.

    Returns:
        ``(sims, ids)``: (k, min(top_k, m)) float32 inner products, descending, and int64 rows
        of S_ref.

    Raises:
        ValueError: ``top_k`` < 1 or dimension mismatch.

    Examples:
        >>> sims, ids = exact_topk(np.array([[0.6, 0.8]], np.float32), np.eye(2, dtype=np.float16), 1)
        >>> ids.tolist(), [round(x, 2) for x in sims[0].tolist()]
        ([[1]], [0.8])
    """
    top = TopkReducer(top_k)
    scan(S_test, S_ref, [top], chunk_size=chunk_size, device=device)
    return top.finish()


def rescore(S_test, S_ref, ids, *, block: int = 32) -> torch.Tensor:
    """Exact inner products <S_test[q], S_ref[ids[q, t]]> of candidate neighbours.

    Used after an approximate (FAISS IVF) search, whose distances are only estimates. Rows
    are gathered in their stored dtype for ``block`` test segments at a time (memory
    ~ block * t * d1 * 6 bytes), converted to float32 and multiplied in a batched GEMM.

    Args:
        S_test: (k, d1) float; S_ref: (m, d1) array, memory map or tensor.
        ids: (k, t) int rows of S_ref; -1 marks a missing candidate.
        block: test segments per gather.

    Returns:
        (k, t) float32 tensor on S_test's device; -inf where ``ids`` is -1.

    Raises:
        ValueError: dimension mismatch, or ``ids`` not (k, t).
    """
    St = as_tensor(S_test, S_test.device if isinstance(S_test, torch.Tensor) else "cpu")
    check_pair(St, S_ref)
    I = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, np.int64)
    if I.ndim != 2 or I.shape[0] != St.shape[0]:
        raise ValueError(f"ids must be (k, t) with k = {St.shape[0]}, got shape {I.shape}")
    k, t = I.shape
    out = torch.empty(k, t, device=St.device)
    safe = np.where(I >= 0, I, 0)
    for q0 in range(0, k, block):
        rows = safe[q0:q0 + block]
        if isinstance(S_ref, torch.Tensor):
            R = S_ref[torch.as_tensor(rows.ravel(), device=S_ref.device)].to(St.device, torch.float32)
        else:
            R = as_view(np.asarray(S_ref[rows.ravel()])).to(St.device, torch.float32)
        R = R.reshape(rows.shape[0], t, -1)
        out[q0:q0 + block] = torch.bmm(R, St[q0:q0 + block, :, None])[:, :, 0]
    out[torch.as_tensor(I < 0, device=St.device)] = -float("inf")
    return out


def topk_label_affinity(sims, ids, o_ref: ORefCSR, *, logit_scale: float = 1.0) -> torch.Tensor:
    """A1 restricted to candidate neighbours: softmax over each row's candidates, times O_ref.

    Args:
        sims: (k, t) float tensor of exact inner products (-inf for missing candidates).
        ids: (k, t) int rows of S_ref (-1 for missing).
        o_ref: [`ORefCSR`][reme.reference.oref.ORefCSR].
        logit_scale: tau1.

    Returns:
        (k, n) float32 sparse CSR tensor A1 (on ``sims``' device; a label reached through
        several candidates has several entries, which ``A1 @ A2`` and ``to_dense`` sum);
        [`topk_class_scores`][reme.inference.retrieval.topk_class_scores] gives P_seg = A1 A2 directly.
    """
    crow, col, vals = candidate_a1_parts(sims, ids, o_ref, logit_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, vals, (crow.shape[0] - 1, o_ref.num_labels), check_invariants=False)


def topk_class_scores(sims, ids, o_ref: ORefCSR, A2: torch.Tensor, *, logit_scale: float = 1.0) -> torch.Tensor:
    """P_seg = A1 A2 with A1 restricted to candidate neighbours
    ([`topk_label_affinity`][reme.inference.retrieval.topk_label_affinity]).

    Args:
        sims, ids, o_ref, logit_scale: as in
            [`topk_label_affinity`][reme.inference.retrieval.topk_label_affinity].
        A2: (n, c) float32 tensor (eq. 2), or several class lists stacked along columns.

    Returns:
        (k, c) float32 tensor.

    Raises:
        ValueError: ``ids`` and ``sims`` shapes differ (from numpy's reshape).

    Examples:
        >>> o = o_ref_csr([0, 1], [0, 1], 2, 2)
        >>> P = topk_class_scores(torch.tensor([[0.9, -float("inf")]]), torch.tensor([[0, -1]]), o, torch.eye(2))
        >>> P.tolist()
        [[1.0, 0.0]]
    """
    A1 = topk_label_affinity(sims, ids, o_ref, logit_scale=logit_scale)
    return A1 @ A2.to(A1.device, torch.float32)


def segment_class_scores(S_test, S_ref, B: torch.Tensor, *, logit_scale: float = 1.0,
                        top_k: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """P_seg = softmax(logit_scale * S_test S_ref^T, axis=1) B, streamed (eqs. 1-2 fused).

    Args:
        S_test: (k, d1) float, L2-normalised test segment embeddings.
        S_ref: (m, d1) float16/float32 array or tensor, L2-normalised (read chunk by chunk,
            so it may be a memory map).
        B: (m, c) float32 tensor, [`reference_class_scores`][reme.inference.retrieval.reference_class_scores].
        logit_scale: tau1 (1 = literal paper form).
        top_k: restrict the softmax to each test segment's ``top_k`` most similar reference
            segments (exact search); None = all m (paper form).
        chunk_size: reference rows per block (memory ~ chunk_size * (d1 + k) floats).

    Returns:
        (k, c) float32 tensor P_seg.

    Raises:
        ValueError: dimension mismatch, B not m rows, top_k < 1 or chunk_size < 1.
    """
    St = as_tensor(S_test, B.device)
    check_pair(St, S_ref)
    if B.shape[0] != S_ref.shape[0]:
        raise ValueError(f"B has {B.shape[0]} rows but S_ref has {S_ref.shape[0]}")
    k, m = St.shape[0], S_ref.shape[0]
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if k == 0 or m == 0:
        return torch.zeros(k, B.shape[1], device=B.device)
    Bf = B.float()
    if top_k is not None:
        vals, ids = exact_topk(St, S_ref, top_k, chunk_size=chunk_size)
        return candidate_class_scores(vals, ids, Bf, logit_scale)
    soft = class_score_reducer(B, k, logit_scale)
    scan(St, S_ref, [soft], chunk_size=chunk_size, device=B.device)
    return soft.finish().T


def segment_label_affinity(S_test, S_ref, pair_segment, pair_label, num_labels: int, *,
                           logit_scale: float = 1.0, top_k: int | None = None, device=None) -> torch.Tensor:
    """A1 = softmax(logit_scale * S_test S_ref^T, axis=1) O_ref, eq. 1 (materialised).

    Args:
        S_test: (k, d1), S_ref: (m, d1) L2-normalised embeddings.
        pair_segment, pair_label: (p,) int, the nonzeros of O_ref (m x n).
        num_labels: n.
        logit_scale, top_k: as in [`segment_class_scores`][reme.inference.retrieval.segment_class_scores].

    Returns:
        (k, n) float32 tensor.

    Raises:
        ValueError: dimension mismatch, pairs out of range, or top_k < 1.

    Examples:
        >>> A1 = segment_label_affinity(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), [0, 1], [1, 0], 2,
        ...                             logit_scale=100.0, top_k=1)
        >>> A1.tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    device = torch.device(device or "cpu")
    St = as_tensor(S_test, device)
    check_pair(St, S_ref)
    m = int(S_ref.shape[0])
    o_ref = o_ref_csr(pair_segment, pair_label, m, num_labels)
    if top_k is not None and top_k < m:
        sims, ids = exact_topk(St, S_ref, top_k, chunk_size=max(m, 1), device=device)
        return topk_label_affinity(sims, ids, o_ref, logit_scale=logit_scale).to_dense()
    return streamed_label_affinity(St, S_ref, o_ref, logit_scale=logit_scale, chunk_size=max(m, 1), device=device)


# --------------------------------------------------------------------------- eq. 3


def pixel_class_scores(P_seg: torch.Tensor, segment_ids: np.ndarray) -> torch.Tensor:
    """Eq. 3 for a partition: P_test[x, y] = P_seg[segment_ids[x, y]] (a gather).

    Since Felzenszwalb segments partition the image, sum_i P_seg[i] M_seg[i, x, y] has exactly
    one term per pixel; memory O(H W c), never O(k H W).

    Args:
        P_seg: (k, c) float tensor.
        segment_ids: (H, W) int segment-id map with ids 0..k-1.

    Returns:
        (H, W, c) float32 tensor.

    Raises:
        IndexError: an id outside 0..k-1 (from torch).

    Examples:
        >>> pixel_class_scores(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), np.array([[0, 1]])).tolist()
        [[[1.0, 0.0], [0.0, 2.0]]]
    """
    ids = torch.as_tensor(np.ascontiguousarray(segment_ids), dtype=torch.int64, device=P_seg.device)
    return P_seg[ids]


def _mask_pixels(masks) -> tuple[np.ndarray, np.ndarray, tuple[int, int], int]:
    """(mask ids, flat pixel ids, (H, W), k) of the nonzeros of possibly overlapping masks."""
    if isinstance(masks, torch.Tensor) and masks.is_sparse:
        masks = masks.coalesce()
        k, H, W = masks.shape
        i, y, x = masks.indices().cpu().numpy()
        keep = masks.values().cpu().numpy() != 0
        return i[keep], (y * W + x)[keep], (H, W), k
    if isinstance(masks, tuple) and len(masks) == 2 and isinstance(masks[1], tuple):
        lists, (H, W) = masks                                                   # (index lists, shape)
        k = len(lists)
        counts = np.array([len(a) for a in lists], np.int64)
        pix = np.concatenate([np.asarray(a, np.int64).ravel() for a in lists]) if k else np.zeros(0, np.int64)
        return np.repeat(np.arange(k), counts), pix, (int(H), int(W)), k
    M = np.asarray(masks.cpu() if isinstance(masks, torch.Tensor) else masks)
    if M.ndim != 3:
        raise ValueError(f"masks must be (k, H, W), got shape {M.shape}")
    k, H, W = M.shape
    i, p = np.nonzero(M.reshape(k, H * W))
    return i, p, (H, W), k


def pixel_class_scores_masks(P_seg: torch.Tensor, masks) -> torch.Tensor:
    """Eq. 3 for possibly overlapping masks (SAM): P_test = sum_i P_seg[i] M_seg[i], sparse.

    The masks are used as a sparse (H W x k) matrix, so memory is O(nnz + H W c), never
    O(k H W) floats.

    Args:
        P_seg: (k, c) float tensor.
        masks: the k binary masks M_seg as (k, H, W) bool array or tensor, a sparse (k, H, W)
            torch tensor, or ``(index_lists, (H, W))`` with k arrays of flat pixel indices.

    Returns:
        (H, W, c) float32 tensor.

    Raises:
        ValueError: the number of masks differs from P_seg's rows, or bad shapes.
    """
    i, p, (H, W), k = _mask_pixels(masks)
    if k != P_seg.shape[0]:
        raise ValueError(f"{k} masks but P_seg has {P_seg.shape[0]} rows")
    dev = P_seg.device
    idx = torch.as_tensor(np.stack([p, i]), dtype=torch.int64, device=dev)
    M = torch.sparse_coo_tensor(idx, torch.ones(p.size, device=dev), (H * W, k), check_invariants=False)
    return torch.sparse.mm(M, P_seg.float()).reshape(H, W, -1)


def normalise_rows(P: torch.Tensor) -> torch.Tensor:
    """Normalised segment confidences P_hat = P_seg / row sum.

    P_seg rows are not distributions (rows of A1 sum to the number of labels per reference
    segment), so thresholds (background, "others") compare the max of P_hat, in [1/C, 1].

    Args:
        P: (k, C) segment-class scores; negative entries are clamped to 0.

    Returns:
        (k, C) float32; all-zero rows stay zero.
    """
    P = P.float().clamp_min(0)
    return P / P.sum(dim=1, keepdim=True).clamp_min(1e-12)
