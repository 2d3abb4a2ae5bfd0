"""What the demo tells about "none of these" (docs/method.md, "None of these"; issue 19): the
unlabelled share of a result, the asked classes the reference set does not cover, and why a
clicked segment was left unlabelled. Built from the public fields of
[`SegmentationResult`][reme.inference.segmenter.SegmentationResult] only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reme.inference.unlabelled import DEFAULT_MIN_SUPPORT

#: Legend name and swatch of unlabelled pixels (the overlay leaves them uncoloured).
UNLABELLED_NAME = "unlabelled"


def unlabelled_entry(res) -> dict[str, Any]:
    """The legend entry of unlabelled pixels of a result.

    Returns:
        ``{"class": "unlabelled", "fraction": share of pixels in [0, 1], "pixels": count,
        "segments": unlabelled segments}`` (all 0 when the rule is off).
    """
    pixels = int((np.asarray(res.label_map) < 0).sum())
    segs = res.extras.get("unlabelled_segments")
    return {"class": UNLABELLED_NAME, "fraction": round(float(res.unlabelled_fraction), 5), "pixels": pixels,
            "segments": int(np.count_nonzero(segs)) if segs is not None else 0}


def coverage_entries(res) -> list[dict[str, Any]]:
    """Per asked class, how well the reference set knows it (``res.coverage``), with one line
    for a class it does not cover.

    Returns:
        One dict per class in ``res.classes`` order: ``class``, ``covered`` (bool),
        ``nearest`` (``[{"label", "similarity" (text cosine), "segments"}]``) and ``warning``
        (a sentence naming the nearest labels and the remedy, "" when covered). Empty when
        the result has no coverage (the rule is off).
    """
    out = []
    for c in res.coverage or []:
        d = c.as_dict()
        d["warning"] = "" if c.covered else _warning(c.name, d["nearest"])
        out.append(d)
    return out


def _warning(name: str, nearest: list[dict]) -> str:
    near = ", ".join(f"{n['label']} ({n['similarity']:.2f}, {n['segments']} segments)" for n in nearest)
    return (f"The reference set has no label close to \"{name}\" (nearest: {near or 'none'}), so it will stay "
            f"mostly unlabelled. Teach it: click a region of it and use \"Label this as\" {name}.")


def segment_extras(res) -> dict[str, np.ndarray]:
    """The per-segment "none of these" arrays of a result worth keeping for `why_unlabelled`:
    ``unlabelled_segments`` (k,) bool, ``none_scores`` and ``nearest_similarity`` (k,) float32
    (NaN where a rule is off); empty when the rule is off."""
    keys = ("unlabelled_segments", "none_scores", "nearest_similarity")
    return {k: np.asarray(res.extras[k]) for k in keys if k in res.extras}


def why_unlabelled(extras: dict, segment: int, class_scores: np.ndarray, min_support: float | None,
                   uncovered: list[str]) -> dict[str, Any]:
    """Why segment ``segment`` was left unlabelled, and the offer to label it.

    Args:
        extras: `segment_extras` of the result.
        segment: the segment id.
        class_scores: (C,) the segment's P_seg row.
        min_support: s_min of the segmenter's rule (None: that rule is off).
        uncovered: the asked classes the reference set does not cover (suggested labels).

    Returns:
        ``{"reasons": ["weak_support" and/or "none_of_these"], "why": one sentence,
        "nearest_similarity", "min_support", "none_score", "best_score" (the top P_seg entry),
        "suggest": labels to offer in "Label this as"}``.
    """
    near = float(extras.get("nearest_similarity", np.full(segment + 1, np.nan))[segment])
    none = float(extras.get("none_scores", np.full(segment + 1, np.nan))[segment])
    scores = np.asarray(class_scores, np.float64)
    best = int(scores.argmax()) if scores.size else -1
    top = float(scores[best]) if best >= 0 else float("nan")
    reasons, parts = [], []
    if min_support is not None and np.isfinite(near) and near < min_support:
        reasons.append("weak_support")
        parts.append(f"weak visual support: its nearest reference segment has similarity {near:.2f}, "
                     f"below {min_support:.2f} (unknown to this reference set)")
    if np.isfinite(none) and (best < 0 or none > top):
        reasons.append("none_of_these")
        parts.append(f"none of the asked classes: the reference labels it resembles speak for none of them "
                     f"(none score {none:.2f} > best class score {top:.2f})")
    if not parts:
        parts.append("no asked class fits it")
    return {"reasons": reasons, "why": "Unlabelled: " + "; ".join(parts) + ".",
            "nearest_similarity": None if not np.isfinite(near) else round(near, 5),
            "min_support": min_support, "none_score": None if not np.isfinite(none) else round(none, 5),
            "best_score": None if best < 0 else round(top, 5), "suggest": list(uncovered)}


def rule_min_support(seg) -> float | None:
    """s_min of a Segmenter's "none of these" rule (`DEFAULT_MIN_SUPPORT` when it does not say)."""
    rule = getattr(seg, "none_rule", None)
    return DEFAULT_MIN_SUPPORT if rule is None else rule.min_support
