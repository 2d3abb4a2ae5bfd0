"""Retrieval evidence: the reference segments behind each test segment's A1 row (eq. 1).

For a test segment i, eq. 1 gives

    A1[i] = softmax(tau1 * S_test[i] S_ref^T) O_ref        (restricted to the top_k nearest
                                                             reference segments when top_k is set)

so the label scores of segment i are a weighted vote of its nearest reference segments. This
module recomputes that vote with a plain exact top-k search over S_ref and returns, per test
segment, the ``top`` nearest reference segments: their ids (rows of S_ref), cosine similarity,
softmax weight in eq. 1 and labels, with the provenance the reference set stores (source image,
box, stage). It deliberately does not call [`reme.inference.retrieval`][reme.inference.retrieval], so it is an
independent check of what the retrieval computed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Neighbours reported per test segment when the segmenter has no top-k (paper form); our choice.
DEFAULT_EVIDENCE_TOP = 10


@dataclass
class RetrievalEvidence:
    """The nearest reference segments of each test segment (eq. 1).

    Attributes:
        reference_ids: (k, t) int64 rows of S_ref, nearest first; -1 pads when m < t.
        similarity: (k, t) float32 cosine similarity <S_test[i], S_ref[j]> in [-1, 1] (NaN pads).
        weight: (k, t) float32 softmax weight of each neighbour in eq. 1, i.e.
            exp(tau1 * sim) / sum over the softmax support (the segmenter's ``top_k`` nearest, or
            all m reference segments in the paper form); 0 for pads.
        covered: (k,) float32 sum of ``weight`` per row: the share of A1[i] the listed
            neighbours explain (1.0 when t >= top_k).
        label_ids: (k, t) lists of label ids (columns of O_ref) of each neighbour.
        labels: the n label strings of the reference set (L_ref rows).
        logit_scale: tau1 used for ``weight``.
        support: the softmax support size (top_k) or None for all reference segments.
    """

    reference_ids: np.ndarray
    similarity: np.ndarray
    weight: np.ndarray
    covered: np.ndarray
    label_ids: list[list[list[int]]]
    labels: list[str]
    logit_scale: float
    support: int | None

    @property
    def num_segments(self) -> int:
        return int(self.reference_ids.shape[0])

    def label_votes(self, segment: int) -> list[tuple[str, float]]:
        """A1 row of one test segment from its listed neighbours: (label, weight) pairs,
        largest first. Equals the nonzeros of A1[segment] when ``covered`` is 1."""
        votes: dict[int, float] = {}
        for w, ids in zip(self.weight[segment].tolist(), self.label_ids[segment]):
            for j in ids:
                votes[j] = votes.get(j, 0.0) + w
        return sorted(((self.labels[j], v) for j, v in votes.items()), key=lambda x: -x[1])

    def records(self, reference=None, segments=None) -> list[dict[str, Any]]:
        """JSON-ready evidence, one dict per test segment.

        Args:
            reference: the [`reme.reference.ReferenceSet`][reme.reference.ReferenceSet], to add each
                neighbour's provenance (``image``, ``bbox`` XYWH, ``source`` stage); None leaves it
                out.
            segments: test segment ids to include (default all).

        Returns:
            ``[{"segment": i, "covered": float, "votes": [[label, weight], ...],
            "neighbours": [{"reference_id", "similarity", "weight", "labels", "image",
            "bbox", "source"}, ...]}, ...]``.
        """
        out = []
        for i in (range(self.num_segments) if segments is None else segments):
            i = int(i)
            neigh = []
            for r, s, w, ids in zip(self.reference_ids[i].tolist(), self.similarity[i].tolist(),
                                    self.weight[i].tolist(), self.label_ids[i]):
                if r < 0:
                    continue
                item: dict[str, Any] = {"reference_id": r, "similarity": round(s, 5), "weight": round(w, 5),
                                        "labels": [self.labels[j] for j in ids]}
                if reference is not None:
                    item["image"] = reference.segment_image[r]
                    item["bbox"] = [int(v) for v in reference.segment_bbox[r]]
                    item["source"] = reference.segment_source[r]
                neigh.append(item)
            out.append({"segment": i, "covered": round(float(self.covered[i]), 5),
                        "votes": [[lab, round(v, 5)] for lab, v in self.label_votes(i)],
                        "neighbours": neigh})
        return out


def _labels_of_segments(pair_segment: np.ndarray, pair_label: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR view of O_ref: (m+1,) row pointers and the label ids sorted by segment."""
    order = np.argsort(pair_segment, kind="stable")
    ptr = np.zeros(m + 1, np.int64)
    np.cumsum(np.bincount(pair_segment, minlength=m), out=ptr[1:])
    return ptr, pair_label[order]


def retrieval_evidence(S_test, reference, *, top: int | None = None, top_k: int | None = None,
                       logit_scale: float = 1.0, chunk_size: int = 65536) -> RetrievalEvidence:
    """The nearest reference segments behind each row of A1 (eq. 1), by exact top-k search.

    Args:
        S_test: (k, d1) float array or tensor, L2-normalised test segment embeddings.
        reference: a [`reme.reference.ReferenceSet`][reme.reference.ReferenceSet] (uses S_ref, O_ref
            pairs, labels).
        top: neighbours reported per test segment (default ``top_k``, else
            `DEFAULT_EVIDENCE_TOP`).
        top_k: the segmenter's eq. 1 softmax support (None = all m, the paper form); sets the
            softmax denominator of ``weight``.
        logit_scale: tau1 of eq. 1.
        chunk_size: S_ref rows per block (memory ~ k * chunk_size floats).

    Returns:
        [`RetrievalEvidence`][reme.inference.evidence.RetrievalEvidence] with t = min(top, m) columns (padded
        to ``top``).

    Raises:
        ValueError: ``top`` or ``top_k`` < 1, or S_test and S_ref dimensions differ.
    """
    top = top if top is not None else (top_k or DEFAULT_EVIDENCE_TOP)
    if top < 1 or (top_k is not None and top_k < 1):
        raise ValueError(f"top and top_k must be >= 1, got top={top}, top_k={top_k}")
    St = torch.as_tensor(np.ascontiguousarray(S_test.detach().cpu().numpy() if isinstance(S_test, torch.Tensor)
                                              else S_test), dtype=torch.float32)
    S_ref = reference.S_ref
    if St.ndim != 2 or St.shape[1] != S_ref.shape[1]:
        raise ValueError(f"S_test {tuple(St.shape)} and S_ref {tuple(S_ref.shape)} must share the dimension d1")
    k, m = St.shape[0], S_ref.shape[0]
    want = min(max(top, top_k or 0), m)
    vals = torch.full((k, 0), -float("inf"))
    ids = torch.zeros((k, 0), dtype=torch.int64)
    lse = torch.full((k,), -float("inf"))
    for start in range(0, m, chunk_size):
        block = np.asarray(S_ref[start:start + chunk_size], np.float32)
        sim = St @ torch.from_numpy(np.ascontiguousarray(block)).T                    # S_test S_ref^T
        if top_k is None:                                                             # paper form: all m
            lse = torch.logaddexp(lse, torch.logsumexp(logit_scale * sim, dim=1))
        v, i = torch.topk(sim, min(want, sim.shape[1]), dim=1)
        vals, order = torch.topk(torch.cat([vals, v], 1), min(want, vals.shape[1] + v.shape[1]), dim=1)
        ids = torch.gather(torch.cat([ids, i + start], 1), 1, order)
    if top_k is not None and k:
        lse = torch.logsumexp(logit_scale * vals[:, :top_k], dim=1)                   # softmax over top_k
    t = min(top, m)
    sim_t, ids_t = vals[:, :t], ids[:, :t]
    w = torch.exp(logit_scale * sim_t - lse[:, None]) if k and t else torch.zeros(k, t)
    ref_ids = np.full((k, top), -1, np.int64)
    sims = np.full((k, top), np.nan, np.float32)
    weights = np.zeros((k, top), np.float32)
    ref_ids[:, :t], sims[:, :t], weights[:, :t] = ids_t.numpy(), sim_t.numpy(), w.numpy()
    ptr, lab = _labels_of_segments(np.asarray(reference.pair_segment, np.int64),
                                   np.asarray(reference.pair_label, np.int64), m)
    label_ids = [[lab[ptr[r]:ptr[r + 1]].tolist() if r >= 0 else [] for r in row] for row in ref_ids.tolist()]
    return RetrievalEvidence(reference_ids=ref_ids, similarity=sims, weight=weights,
                             covered=weights.sum(1).astype(np.float32), label_ids=label_ids,
                             labels=list(reference.labels), logit_scale=float(logit_scale), support=top_k)


def label_class_affinity(L_ref_rows, L_test, *, logit_scale: float = 1.0, owner=None,
                         num_classes: int | None = None) -> np.ndarray:
    """Rows of A2 (eq. 2): how much each reference label speaks for each test class.

    A2[j] = softmax(tau2 * L_ref[j] L_test^T) over the c' class strings (synonyms included);
    with ``owner``, the columns of one class's synonyms are merged by max, as the segmenter
    merges P_seg.

    Args:
        L_ref_rows: (r, d2) float, L2-normalised embeddings of the reference labels of interest.
        L_test: (c', d2) float, L2-normalised class-string embeddings.
        logit_scale: tau2 of eq. 2.
        owner: (c',) int class index of each class string (None: one string per class).
        num_classes: C (default ``max(owner) + 1``).

    Returns:
        (r, C) float32.

    Raises:
        ValueError: dimensions differ or ``owner`` has the wrong length.
    """
    Lr = np.asarray(L_ref_rows, np.float32)
    Lt = np.asarray(L_test, np.float32)
    if Lr.ndim != 2 or Lt.ndim != 2 or Lr.shape[1] != Lt.shape[1]:
        raise ValueError(f"L_ref rows {Lr.shape} and L_test {Lt.shape} must share the dimension d2")
    logits = logit_scale * (Lr @ Lt.T)
    logits -= logits.max(axis=1, keepdims=True)
    A2 = np.exp(logits)
    A2 /= A2.sum(axis=1, keepdims=True)
    if owner is None:
        return A2.astype(np.float32)
    owner = np.asarray(owner, np.int64)
    if owner.shape != (Lt.shape[0],):
        raise ValueError(f"owner has {owner.shape} entries for {Lt.shape[0]} class strings")
    C = int(num_classes if num_classes is not None else owner.max() + 1)
    out = np.zeros((Lr.shape[0], C), np.float32)
    for c in range(C):
        cols = owner == c
        if cols.any():
            out[:, c] = A2[:, cols].max(axis=1)
    return out
