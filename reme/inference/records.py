"""The plain records of inference: what `Predictor.predict` returns
([`SegmentationResult`][reme.inference.records.SegmentationResult]) and the overlay tables an
[`OverlayEditor`][reme.inference.editor.OverlayEditor] hands to it
([`OverlayTables`][reme.inference.records.OverlayTables])."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from reme.reference.oref import ORefCSR

__all__ = ["SegmentationResult", "OverlayTables"]


@dataclass
class SegmentationResult:
    """Output of [`Segmenter.predict`][reme.inference.segmenter.Segmenter.predict] (numpy only).

    (H, W) is the input image's size. An input over ``max_working_pixels`` is segmented at a
    smaller working size (``extras["working_size"]``); the maps are then brought back to (H, W):
    nearest for ``label_map`` and ``segment_ids``, bilinear for ``scores``.

    Attributes:
        label_map: (H, W) int32, index into ``classes`` of each pixel, or
            `reme.inference.unlabelled.UNLABELLED` (-1) where no asked class fits ("none of
            these", docs/method.md; off with ``Segmenter(unlabelled=False)``).
        classes: the C class *display names*: the first synonym of each class as given
            (``"floor; ground"`` gives ``"floor"``; `reme.classes.parse_classes`), plus
            ``"others"`` when ``others_threshold`` is set. Order as given.
        segment_ids: (H, W) int32 proposal id of each pixel (0..k-1).
        segment_scores: (k, C) float32 P_seg = A1 A2 (eqs. 1-2), values >= 0. Not a
            distribution: a row does not sum to 1. Eq. 2's softmax runs over every synonym
            string, and merging the synonyms of a class by max drops the others' share (rows
            of 0.75-1.0 are typical with the embedded reference, whose segments carry one
            label each); a reference segment paired with several labels votes once per label
            (rows can then exceed 1). Compare values within a row (argmax), or normalise rows
            (`reme.inference.retrieval.normalise_rows`) for a distribution.
        class_fractions: (C,) float64 fraction of pixels assigned to each class.
        scores: (H, W, C) float32 P_test (eq. 3: the P_seg row of each pixel's segment, same
            row sums as ``segment_scores``), only with ``return_scores=True`` (else None).
        extras: ``working_size`` (h, w), the size the image was segmented at; with the
            "none of these" rule also ``unlabelled_segments`` (k,) bool, ``none_scores`` (k,)
            float32 (the none column of P_seg', NaN when that rule is off) and
            ``nearest_similarity`` (k,) float32 (cosine of each segment's nearest reference
            segment, NaN when the support rule is off).
        unlabelled_fraction: fraction of pixels left unlabelled (``label_map`` -1; 0 when the
            rule is off).
        coverage: per class a [`ClassCoverage`][reme.inference.unlabelled.ClassCoverage] (its
            nearest reference labels and whether one reaches t_none); None when the rule is off.
        evidence: `reme.inference.evidence.RetrievalEvidence`, the nearest reference segments
            behind each test segment's A1 row, only with ``return_evidence=True`` (else None).
    """

    label_map: np.ndarray
    classes: list[str]
    segment_ids: np.ndarray
    segment_scores: np.ndarray
    class_fractions: np.ndarray
    scores: np.ndarray | None = None
    extras: dict = field(default_factory=dict)
    evidence: Any = None
    unlabelled_fraction: float = 0.0
    coverage: list | None = None


@dataclass
class OverlayTables:
    """Retrieval tables of base + overlay rows, made by
    [`OverlayEditor`][reme.inference.editor.OverlayEditor] (the base is never copied).

    Attributes:
        S_ov: (r, d1) overlay rows (array on the CPU, tensor on an accelerator).
        S_all: (m + r, d1) `StackedRows` view (CPU), a tensor, or None (made when needed).
        o_ref: (m + r) x (n + n_new) [`ORefCSR`][reme.reference.oref.ORefCSR].
        row_labels: (r,) merged label id of each overlay row.
        new_labels: the overlay's labels the base lacks (ids n, n + 1, ...).
        L_new: (n_new, d2) float32 tensor of their L_ref rows, or None.
    """

    S_ov: Any
    S_all: Any
    o_ref: ORefCSR
    row_labels: np.ndarray
    new_labels: list[str]
    L_new: torch.Tensor | None
