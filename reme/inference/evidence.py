"""Retrieval evidence: the reference segments behind each test segment's A1 row (eq. 1).

For a test segment i, eq. 1 gives

    A1[i] = softmax(tau1 * S_test[i] S_ref^T) O_ref        (restricted to the top_k nearest
                                                             reference segments when top_k is set)

so the label scores of segment i are a weighted vote of its nearest reference segments. This
module returns, per test segment, the ``top`` nearest reference segments: their ids (rows of
S_ref), cosine similarity, softmax weight in eq. 1 and labels, with the provenance the reference
set stores (source image, box, stage). The neighbours and the softmax normaliser come from the
retrieval kernel ([`reme.inference.kernel.scan`][reme.inference.kernel.scan]: a top-k reducer,
plus the softmax reducer's log-sum-exp in the paper form), either in a pass of their own
([`retrieval_evidence`][reme.inference.evidence.retrieval_evidence]) or from the pass that
computed P_seg ([`evidence_from_neighbours`][reme.inference.evidence.evidence_from_neighbours]).
The tests check the evidence against a literal transcription of eq. 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reme.inference.kernel import SoftmaxReducer, TopkReducer, as_tensor, scan
from reme.inference.retrieval import label_affinity, merge_synonyms
from reme.reference.oref import o_ref_csr

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
        """k, the test segments."""
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


def retrieval_evidence(S_test, reference, *, top: int | None = None, top_k: int | None = None,
                       logit_scale: float = 1.0, chunk_size: int = 65536) -> RetrievalEvidence:
    """The nearest reference segments behind each row of A1 (eq. 1), by exact top-k search.

    One pass of the retrieval kernel over S_ref with a top-k reducer and, in the paper form
    (``top_k`` None), the softmax reducer for the normaliser over all m reference segments.

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
    return neighbour_evidence(S_test, reference.S_ref,
                              o_ref_csr(reference.pair_segment, reference.pair_label, reference.num_segments,
                                        reference.num_labels),
                              reference.labels, top=top, top_k=top_k, logit_scale=logit_scale, chunk_size=chunk_size)


def neighbour_evidence(S_test, S_ref, o_ref, labels, *, top: int | None = None, top_k: int | None = None,
                       logit_scale: float = 1.0, chunk_size: int = 65536) -> RetrievalEvidence:
    """[`retrieval_evidence`][reme.inference.evidence.retrieval_evidence] over explicit tables: one
    exact pass of the kernel over ``S_ref`` (on the CPU).

    Args:
        S_test: (k, d1) float array or tensor; S_ref: (m, d1) array, memory map, view or tensor.
        o_ref: [`ORefCSR`][reme.reference.oref.ORefCSR] with m rows; labels: its n label strings.
        top, top_k, logit_scale, chunk_size: as in
            [`retrieval_evidence`][reme.inference.evidence.retrieval_evidence].

    Returns:
        [`RetrievalEvidence`][reme.inference.evidence.RetrievalEvidence].

    Raises:
        ValueError: ``top`` or ``top_k`` < 1, or S_test and S_ref dimensions differ.
    """
    top = _check_top(top, top_k)
    St = as_tensor(S_test.detach().cpu() if isinstance(S_test, torch.Tensor) else S_test, "cpu")
    if St.ndim != 2 or St.shape[1] != S_ref.shape[1]:
        raise ValueError(f"S_test {tuple(St.shape)} and S_ref {tuple(S_ref.shape)} must share the dimension d1")
    m = int(S_ref.shape[0])
    heap = TopkReducer(max(1, min(max(top, top_k or 0), m)))
    soft = SoftmaxReducer(logit_scale) if top_k is None else None
    if m:
        scan(St, S_ref, [heap] + ([soft] if soft else []), chunk_size=chunk_size, device="cpu")
    else:
        heap.add_candidates(torch.zeros(St.shape[0], 0), torch.zeros(St.shape[0], 0, dtype=torch.int64))
    return evidence_from_neighbours(*heap.finish(), o_ref, labels, top=top, top_k=top_k, logit_scale=logit_scale,
                                    log_normaliser=soft.log_normaliser() if soft and m else None)


def _check_top(top: int | None, top_k: int | None) -> int:
    top = top if top is not None else (top_k or DEFAULT_EVIDENCE_TOP)
    if top < 1 or (top_k is not None and top_k < 1):
        raise ValueError(f"top and top_k must be >= 1, got top={top}, top_k={top_k}")
    return int(top)


def evidence_from_neighbours(sims, ids, o_ref, labels, *, top: int | None = None, top_k: int | None = None,
                             logit_scale: float = 1.0, log_normaliser=None) -> RetrievalEvidence:
    """[`RetrievalEvidence`][reme.inference.evidence.RetrievalEvidence] from a top-k result of the
    retrieval kernel ([`reme.inference.kernel.TopkReducer`][reme.inference.kernel.TopkReducer]).

    Args:
        sims: (k, t) float cosine similarities, descending; ids: (k, t) int rows of S_ref.
            t must be at least ``min(top, m)`` and, with ``top_k``, at least ``top_k`` when m allows.
        o_ref: [`ORefCSR`][reme.reference.oref.ORefCSR] of the searched reference rows.
        labels: the n label strings (columns of O_ref).
        top, top_k, logit_scale: as in
            [`retrieval_evidence`][reme.inference.evidence.retrieval_evidence].
        log_normaliser: (k,) log sum_j exp(tau1 <S_test[i], S_ref[j]>) over all rows
            ([`SoftmaxReducer.log_normaliser`][reme.inference.kernel.SoftmaxReducer.log_normaliser]);
            needed when ``top_k`` is None, ignored otherwise (the normaliser is then over the
            first ``top_k`` columns).

    Returns:
        [`RetrievalEvidence`][reme.inference.evidence.RetrievalEvidence], padded to ``top`` columns.

    Raises:
        ValueError: ``top`` or ``top_k`` < 1, or ``top_k`` None without ``log_normaliser`` while
            there are neighbours.
    """
    top = _check_top(top, top_k)
    vals = torch.as_tensor(sims, dtype=torch.float32).cpu()
    idx = torch.as_tensor(ids).cpu()
    k = vals.shape[0]
    t = min(top, vals.shape[1])
    sim_t, ids_t = vals[:, :t], idx[:, :t]
    if top_k is not None and k:
        lse = torch.logsumexp(logit_scale * vals[:, :top_k], dim=1)                  # softmax over top_k
    elif k and t:
        if log_normaliser is None:
            raise ValueError("the paper form (top_k None) needs the softmax normaliser of all reference segments")
        lse = torch.as_tensor(log_normaliser, dtype=torch.float32).cpu()
    else:
        lse = torch.zeros(k)
    w = torch.exp(logit_scale * sim_t - lse[:, None]) if k and t else torch.zeros(k, t)
    ref_ids = np.full((k, top), -1, np.int64)
    sims_out = np.full((k, top), np.nan, np.float32)
    weights = np.zeros((k, top), np.float32)
    ref_ids[:, :t], sims_out[:, :t], weights[:, :t] = ids_t.numpy(), sim_t.numpy(), w.numpy()
    ptr, lab = o_ref.ptr, o_ref.label
    label_ids = [[lab[ptr[r]:ptr[r + 1]].tolist() if r >= 0 else [] for r in row] for row in ref_ids.tolist()]
    return RetrievalEvidence(reference_ids=ref_ids, similarity=sims_out, weight=weights,
                             covered=weights.sum(1).astype(np.float32), label_ids=label_ids,
                             labels=list(labels), logit_scale=float(logit_scale), support=top_k)


def label_class_affinity(L_ref_rows, L_test, *, logit_scale: float = 1.0, owner=None,
                         num_classes: int | None = None) -> np.ndarray:
    """Rows of A2 (eq. 2): how much each reference label speaks for each test class.

    A2[j] = softmax(tau2 * L_ref[j] L_test^T) over the c' class strings (synonyms included;
    [`reme.inference.retrieval.label_affinity`][reme.inference.retrieval.label_affinity]); with ``owner``,
    the columns of one class's synonyms are merged by max, as the segmenter merges P_seg
    ([`reme.inference.retrieval.merge_synonyms`][reme.inference.retrieval.merge_synonyms]).

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
    A2 = label_affinity(Lr, Lt, logit_scale)
    if owner is None:
        return A2.numpy()
    owner = np.asarray(owner, np.int64)
    if owner.shape != (Lt.shape[0],):
        raise ValueError(f"owner has {owner.shape} entries for {Lt.shape[0]} class strings")
    C = int(num_classes if num_classes is not None else owner.max() + 1)
    return merge_synonyms(A2, torch.as_tensor(owner), C).clamp_min(0).numpy()
