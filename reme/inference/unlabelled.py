""""None of these": leave unlabelled what matches no asked class (docs/method.md, "None of
these").

Eq. 2 hands every reference label to some asked class, however unrelated, and eq. 3 then
assigns every pixel. Two rules let a segment stay unlabelled:

* **A none column in eq. 2.** One more column with a fixed logit ``tau2 * t_none``:

      A2' = softmax([tau2 L_ref L_test^T, tau2 t_none 1], axis=1)      n x (c + 1)

  A reference label whose text similarity to every asked class is below ``t_none`` sends most
  of its mass to *none*. P_seg' = A1 A2' (k x (c + 1)); a segment whose largest entry is the
  none column is unlabelled. The class columns of A2' are A2 scaled per row by
  ``1 - p_none``, so [`with_none_column`][reme.inference.unlabelled.with_none_column] builds A2'
  from the cached A2 and the none share alone.
* **Weak visual support.** A segment whose nearest reference segment has cosine similarity
  below ``s_min`` is unlabelled ("unknown to this reference set").

Unlabelled pixels are `UNLABELLED` (-1) in ``SegmentationResult.label_map``, 255 in 8-bit label
PNGs and 65535 in 16-bit ones (`reme.report.viz.PNG_UNLABELLED_8`, ``PNG_UNLABELLED_16``).

[`class_coverage`][reme.inference.unlabelled.class_coverage] tells, per asked class, the nearest
reference labels: a class none of whose labels reaches ``t_none`` can never win a segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

#: label_map value of an unlabelled pixel.
UNLABELLED = -1

#: t_none, the none column's text-similarity threshold (cosine, MiniLM with the reference set's
#: templates), and s_min, the weakest nearest-neighbour cosine that still counts as visual
#: support. Chosen on train splits only (docs/results.md, "None of these": CamVid train frames
#: not in the embedded reference, coco_tiny train against a reference without them).
DEFAULT_NONE_THRESHOLD = 0.7
DEFAULT_MIN_SUPPORT = 0.6
#: Nearest reference labels listed per asked class by `class_coverage`.
COVERAGE_TOP = 3


@dataclass(frozen=True)
class NoneRule:
    """The two "none of these" thresholds; None switches a rule off.

    Attributes:
        label_threshold: t_none, cosine in [-1, 1] (the none column's logit / tau2).
        min_support: s_min, cosine in [-1, 1].
    """

    label_threshold: float | None = DEFAULT_NONE_THRESHOLD
    min_support: float | None = DEFAULT_MIN_SUPPORT

    @property
    def active(self) -> bool:
        return self.label_threshold is not None or self.min_support is not None


#: The rule that leaves everything assigned (paper eqs. 1-3).
OFF = NoneRule(None, None)


def resolve_rule(value) -> NoneRule:
    """A `NoneRule` from True (the defaults), False / None (off), a NoneRule, or a
    ``(t_none, s_min)`` pair.

    Raises:
        ValueError: a threshold outside [-1, 1] or not a number.
    """
    if value is True:
        return NoneRule()
    if value is False or value is None:
        return OFF
    if isinstance(value, NoneRule):
        rule = value
    else:
        try:
            t, s = value
        except (TypeError, ValueError):
            raise ValueError(f"unlabelled must be True, False, a NoneRule or (t_none, s_min), got {value!r}") from None
        rule = NoneRule(t, s)
    for name, v in (("t_none", rule.label_threshold), ("s_min", rule.min_support)):
        if v is not None and not (isinstance(v, (int, float)) and -1.0 <= float(v) <= 1.0):
            raise ValueError(f"{name} must be a cosine in [-1, 1] or None, got {v!r}")
    return rule


def none_share(L_ref: torch.Tensor, L_test: torch.Tensor, logit_scale: float, threshold: float) -> torch.Tensor:
    """p_none (n,) = the none column of A2' = softmax([tau2 L_ref L_test^T, tau2 t_none]).

    Args:
        L_ref: (n, d2) float tensor, L2-normalised reference label embeddings.
        L_test: (c, d2) float tensor, L2-normalised class embeddings (every synonym string).
        logit_scale: tau2. threshold: t_none.

    Returns:
        (n,) float32 tensor in (0, 1).
    """
    logits = logit_scale * (L_ref.float() @ L_test.float().T)                   # (n, c)
    none = torch.full((logits.shape[0], 1), float(logit_scale) * float(threshold), device=logits.device)
    return torch.softmax(torch.cat([logits, none], 1), dim=1)[:, -1]


def with_none_column(A2: torch.Tensor, p_none: torch.Tensor) -> torch.Tensor:
    """A2' (n, c + 1) from A2 = softmax(tau2 L_ref L_test^T) (n, c) and p_none (n,):
    ``[A2 * (1 - p_none), p_none]``, which equals the softmax with the extra column."""
    p = p_none.to(A2.device, A2.dtype)[:, None]
    return torch.cat([A2 * (1.0 - p), p], dim=1)


def nearest_similarity(S_test, tables, chunk_size: int | None = None) -> torch.Tensor:
    """(k,) float32 cosine of each test segment's nearest reference segment over one or more
    S_ref tables (the base set, then an overlay's rows); -inf when all are empty.

    An exact top-1 search ([`exact_topk`][reme.inference.retrieval.exact_topk]); the exact
    top-k retrieval of eq. 1 already has it as its heap's first column (`top1`), which
    [`Predictor.class_scores`][reme.inference.predictor.Predictor.class_scores] reads instead."""
    from reme.inference.retrieval import DEFAULT_CHUNK_SIZE, exact_topk

    best = torch.full((S_test.shape[0],), -float("inf"), device=S_test.device)
    for S in tables:
        if S is not None and S.shape[0] > 0 and S_test.shape[0] > 0:
            sims, _ = exact_topk(S_test, S, 1, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE)
            best = torch.maximum(best, top1(sims).to(best.device))
    return best


def top1(sims: torch.Tensor) -> torch.Tensor:
    """(k,) float32 first column of (k, t) descending similarities (a top-k heap's), -inf when
    t is 0 (no reference rows)."""
    if sims.shape[1] == 0:
        return torch.full((sims.shape[0],), -float("inf"), device=sims.device)
    return sims[:, 0].float()


def extend_scores(P: torch.Tensor, none: torch.Tensor | None, nearest: torch.Tensor | None,
                  rule: NoneRule) -> tuple[torch.Tensor, torch.Tensor]:
    """P_seg with the none column appended, and the unlabelled segments.

    Args:
        P: (k, C) class scores (synonyms merged).
        none: (k,) P_seg' none column (A1 A2'), or None when the label rule is off.
        nearest: (k,) nearest-neighbour cosine, or None when the support rule is off.
        rule: the thresholds.

    Returns:
        ``(P_ext, unlabelled)``: (k, C + 1) float tensor whose argmax is C exactly for the
        unlabelled segments (a weakly supported segment's none entry is raised above its row's
        maximum), and (k,) bool.
    """
    k = P.shape[0]
    col = none.to(P.device, P.dtype) if none is not None else torch.zeros(k, device=P.device, dtype=P.dtype)
    top = P.max(dim=1).values if P.shape[1] else torch.full((k,), -float("inf"), device=P.device)
    unl = col > top
    if rule.min_support is not None and nearest is not None:
        weak = nearest.to(P.device) < float(rule.min_support)
        col = torch.where(weak, torch.maximum(top, col) + 1.0, col)
        unl = unl | weak
    return torch.cat([P, col[:, None]], dim=1), unl


def to_label_map(index_map: np.ndarray, num_classes: int) -> np.ndarray:
    """An argmax map over C + 1 columns with C meaning unlabelled -> int32 map with -1 there."""
    out = np.asarray(index_map, np.int32)
    return np.where(out == num_classes, UNLABELLED, out).astype(np.int32)


def label_fractions(label_map: np.ndarray, n: int, rows: int = 1024) -> tuple[np.ndarray, float]:
    """``(fractions (n,) float64, unlabelled fraction)`` of an (H, W) label map whose values are
    0..n-1 or `UNLABELLED`; counted ``rows`` rows at a time."""
    counts = np.zeros(n + 1, np.int64)
    for r in range(0, label_map.shape[0], rows):
        block = label_map[r:r + rows].ravel()
        counts += np.bincount(np.where(block < 0, n, block), minlength=n + 1)[:n + 1]
    total = max(label_map.size, 1)
    return counts[:n] / total, float(counts[n] / total)


# --------------------------------------------------------------------------- coverage


@dataclass
class ClassCoverage:
    """How well the reference set knows one asked class.

    Attributes:
        name: the class display name.
        nearest: up to `COVERAGE_TOP` ``(label, text cosine, reference segments)`` triples,
            most similar first (over the class's synonyms).
        covered: True when some reference label reaches t_none (else no reference label sends
            most of its eq. 2 mass to this class, so it can only win against other classes
            when t_none is off).
    """

    name: str
    nearest: list[tuple[str, float, int]] = field(default_factory=list)
    covered: bool = True

    def as_dict(self) -> dict:
        return {"class": self.name, "covered": self.covered,
                "nearest": [{"label": t, "similarity": round(s, 4), "segments": n} for t, s, n in self.nearest]}


def label_segment_counts(pair_label, num_labels: int) -> np.ndarray:
    """(n,) int64 reference segments behind each label (column sums of O_ref)."""
    return np.bincount(np.asarray(pair_label, np.int64), minlength=num_labels)[:num_labels]


def class_coverage(names: list[str], L_test: torch.Tensor, owner, L_ref: torch.Tensor, labels: list[str],
                   counts: np.ndarray, threshold: float | None, top: int = COVERAGE_TOP) -> list[ClassCoverage]:
    """Per asked class, its nearest reference labels by text cosine and whether it is covered.

    Args:
        names: C class display names. L_test: (c', d2) embeddings of every synonym string;
        owner: (c',) class index of each. L_ref: (n, d2); labels: the n label strings;
        counts: (n,) segments per label (`label_segment_counts`).
        threshold: t_none; None marks every class covered.

    Returns:
        C [`ClassCoverage`][reme.inference.unlabelled.ClassCoverage].
    """
    sims = (L_test.float() @ L_ref.float().T).cpu().numpy()                    # (c', n)
    own = np.asarray(owner.cpu() if isinstance(owner, torch.Tensor) else owner)
    out = []
    for ci, name in enumerate(names):
        best = sims[own == ci].max(axis=0) if np.any(own == ci) else np.full(len(labels), -1.0)
        order = np.argsort(-best, kind="stable")[:top]
        near = [(labels[j], float(best[j]), int(counts[j])) for j in order]
        ok = threshold is None or (bool(near) and near[0][1] >= float(threshold))
        out.append(ClassCoverage(name, near, ok))
    return out


def coverage_warning(coverage: list[ClassCoverage]) -> str | None:
    """One plain line naming the classes the reference set has no close label for, their nearest
    labels and the remedy; None when every class is covered."""
    missing = [c for c in coverage if not c.covered]
    if not missing:
        return None
    parts = [f"'{c.name}' (nearest: " + ", ".join(f"{t} {s:.2f}" for t, s, _ in c.nearest) + ")" for c in missing]
    return ("warning: the reference set has no label close to " + "; ".join(parts)
            + ": these classes will stay mostly unlabelled; teach them with 'reme add-examples' "
            "or the demo's \"Label this as\"")
