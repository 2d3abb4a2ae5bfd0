"""Retrieval-based inference, METHOD.md Part 2, eqs. 1-3.

    A1    = softmax(tau1 * S_test S_ref^T, axis=1) O_ref     (k x n)   eq. 1
    A2    = softmax(tau2 * L_ref L_test^T, axis=1)           (n x c)   eq. 2
    P_seg = A1 A2                                            (k x c)
    P_test[x, y, j] = sum_i P_seg[i, j] M_seg[i, x, y]       (h x w x c) eq. 3

``tau1`` / ``tau2`` are the logit scales (inverse temperatures) of the two softmaxes; the
notes give none, so the literal paper form is ``tau = 1`` and ``top_k = None``.

Since P_seg = softmax(.) (O_ref A2), reme computes B = O_ref A2 (m x c) once per class
list and streams the softmax over chunks of S_ref with an online log-sum-exp, so neither
the k x m similarity matrix nor A1 is ever materialised (:func:`segment_class_probs`).
:func:`segment_label_affinity` computes A1 itself, for inspection and tests.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_tensor(x, device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    arr = np.ascontiguousarray(x)
    if not arr.flags.writeable:  # Arrow / memory-mapped buffers: torch wants writable memory
        arr = arr.copy()
    return torch.as_tensor(arr, device=device).to(dtype)


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
    """
    device = device or (L_ref.device if isinstance(L_ref, torch.Tensor) else "cpu")
    Lr, Lt = _as_tensor(L_ref, device), _as_tensor(L_test, device)
    _check_dims(Lr, Lt, "L_ref", "L_test")
    return torch.softmax(logit_scale * (Lr @ Lt.T), dim=1)


def reference_class_scores(pair_segment, pair_label, A2: torch.Tensor, num_segments: int) -> torch.Tensor:
    """B = O_ref A2: (m, c) float32, row i = sum of A2 rows of the labels of segment i."""
    ps = _as_tensor(pair_segment, A2.device, torch.int64)
    pl = _as_tensor(pair_label, A2.device, torch.int64)
    B = torch.zeros(num_segments, A2.shape[1], device=A2.device, dtype=torch.float32)
    return B.index_add_(0, ps, A2[pl])


def _topk_similarities(St: torch.Tensor, S_ref, top_k: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products over chunks of S_ref: (k, top_k) values, (k, top_k) ids."""
    m = S_ref.shape[0]
    vals = torch.full((St.shape[0], 0), -float("inf"), device=St.device)
    ids = torch.zeros((St.shape[0], 0), dtype=torch.int64, device=St.device)
    for start in range(0, m, chunk_size):
        Sr = _as_tensor(S_ref[start:start + chunk_size], St.device)
        sim = St @ Sr.T
        kk = min(top_k, sim.shape[1])
        v, i = torch.topk(sim, kk, dim=1)
        vals, order = torch.topk(torch.cat([vals, v], 1), min(top_k, vals.shape[1] + kk), dim=1)
        ids = torch.gather(torch.cat([ids, i + start], 1), 1, order)
    return vals, ids


def segment_class_probs(S_test, S_ref, B: torch.Tensor, *, logit_scale: float = 1.0,
                        top_k: int | None = None, chunk_size: int = 65536) -> torch.Tensor:
    """P_seg = softmax(logit_scale * S_test S_ref^T, axis=1) B, streamed (eqs. 1-2 fused).

    Args:
        S_test: (k, d1) float, L2-normalised test segment embeddings.
        S_ref: (m, d1) float16/float32 array or tensor, L2-normalised (read chunk by chunk,
            so it may be a memory map).
        B: (m, c) float32 tensor, :func:`reference_class_scores`.
        logit_scale: tau1 (1 = literal paper form).
        top_k: restrict the softmax to each test segment's ``top_k`` most similar reference
            segments (exact search); None = all m (paper form).
        chunk_size: reference rows per block (memory ~ k * chunk_size floats).

    Returns:
        (k, c) float32 tensor P_seg.
    """
    St = _as_tensor(S_test, B.device)
    if St.ndim != 2 or S_ref.ndim != 2 or St.shape[1] != S_ref.shape[1]:
        raise ValueError(f"S_test and S_ref must be (k, d) and (m, d) with the same d, got {tuple(St.shape)} and {tuple(S_ref.shape)}")
    if B.shape[0] != S_ref.shape[0]:
        raise ValueError(f"B has {B.shape[0]} rows but S_ref has {S_ref.shape[0]}")
    k, m = St.shape[0], S_ref.shape[0]
    if k == 0 or m == 0:
        return torch.zeros(k, B.shape[1], device=B.device)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        vals, ids = _topk_similarities(St, S_ref, top_k, chunk_size)
        w = torch.softmax(logit_scale * vals, dim=1)                      # (k, top_k)
        return torch.einsum("kt,ktc->kc", w, B[ids])
    run_max = torch.full((k, 1), -float("inf"), device=B.device)
    denom = torch.zeros(k, 1, device=B.device)
    acc = torch.zeros(k, B.shape[1], device=B.device)
    for start in range(0, m, chunk_size):
        Sr = _as_tensor(S_ref[start:start + chunk_size], B.device)
        logits = logit_scale * (St @ Sr.T)
        new_max = torch.maximum(run_max, logits.max(dim=1, keepdim=True).values)
        rescale = torch.exp(run_max - new_max)
        e = torch.exp(logits - new_max)
        denom = denom * rescale + e.sum(dim=1, keepdim=True)
        acc = acc * rescale + e @ B[start:start + Sr.shape[0]]
        run_max = new_max
    return acc / denom


def segment_label_affinity(S_test, S_ref, pair_segment, pair_label, num_labels: int, *,
                           logit_scale: float = 1.0, top_k: int | None = None, device=None) -> torch.Tensor:
    """A1 = softmax(logit_scale * S_test S_ref^T, axis=1) O_ref, eq. 1 (materialised).

    Args:
        S_test: (k, d1), S_ref: (m, d1) L2-normalised embeddings.
        pair_segment, pair_label: (p,) int, the nonzeros of O_ref (m x n).
        num_labels: n.
        logit_scale, top_k: as in :func:`segment_class_probs`.

    Returns:
        (k, n) float32 tensor.
    """
    device = device or "cpu"
    St, Sr = _as_tensor(S_test, device), _as_tensor(S_ref, device)
    _check_dims(St, Sr, "S_test", "S_ref")
    logits = logit_scale * (St @ Sr.T)
    if top_k is not None and top_k < Sr.shape[0]:
        thresh = torch.topk(logits, top_k, dim=1).values[:, -1:]
        # ties at the threshold are kept; same set as torch.topk when similarities are distinct
        logits = logits.masked_fill(logits < thresh, -float("inf"))
    W = torch.softmax(logits, dim=1)
    A1 = torch.zeros(St.shape[0], num_labels, device=device)
    return A1.index_add_(1, _as_tensor(pair_label, device, torch.int64), W[:, _as_tensor(pair_segment, device, torch.int64)])


def pixel_class_probs(P_seg: torch.Tensor, segment_ids: np.ndarray) -> torch.Tensor:
    """Eq. 3 for a partition: P_test[x, y] = P_seg[segment_ids[x, y]] (a gather).

    Args:
        P_seg: (k, c) float tensor.
        segment_ids: (H, W) int segment-id map with ids 0..k-1.

    Returns:
        (H, W, c) float32 tensor.
    """
    ids = torch.as_tensor(np.ascontiguousarray(segment_ids), dtype=torch.int64, device=P_seg.device)
    return P_seg[ids]


def pixel_class_probs_masks(P_seg: torch.Tensor, masks: np.ndarray) -> torch.Tensor:
    """Eq. 3 for possibly overlapping masks: P_test = sum_i P_seg[i] M_seg[i].

    Args:
        P_seg: (k, c) float tensor.
        masks: (k, H, W) bool.

    Returns:
        (H, W, c) float32 tensor.
    """
    M = torch.as_tensor(masks, device=P_seg.device).float()
    return torch.einsum("khw,kc->hwc", M, P_seg)
