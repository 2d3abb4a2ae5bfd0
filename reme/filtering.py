"""Reference-set cleaning: group-median filter and ambiguous-label knee filter
(METHOD.md steps 7 and 8).

Both work on *pairs* (segment index, root noun): a pair is a label attached to a segment.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def group_median_filter(S: np.ndarray, pair_segment: np.ndarray, pair_root: Sequence[str], *,
                        drop_rate: float = 0.30, adaptive: bool = False,
                        max_drop_rate: float = 0.50, return_scores: bool = False):
    """Keep-mask of pairs after group-based filtering (METHOD.md step 7).

    Pairs are grouped by root noun. Per group, S_center is the element-wise median of the
    members' visual embeddings; members are scored by <S_i, S_center> and the lowest
    ``drop_rate`` fraction of each group is dropped (delta_filter = 30 % in the paper;
    ``floor(drop_rate * size)`` members, so groups of 1-3 lose nothing at 30 %).

    Adaptive variant (``adaptive=True``, better in the paper): the group's drop rate is
    ``max_drop_rate * w / max_g w_g`` with inconsistency w = mean_i(1 - <S_i, S_center>), so
    the most inconsistent group drops ``max_drop_rate`` and a perfectly consistent one nothing
    (range [0, 50 %]; the scaling is our choice, the notes give only the range and w).

    Args:
        S: (m, d) float32 visual segment embeddings, L2-normalised.
        pair_segment: (p,) int row of S for each pair.
        pair_root: p root nouns.
        drop_rate: fixed fraction in [0, 1) dropped per group.
        adaptive: use the adaptive per-group rate.
        max_drop_rate: upper end of the adaptive range.

        return_scores: also return each pair's score <S_i, S_center>.

    Returns:
        (p,) bool, True for pairs kept; with ``return_scores``, also (p,) float32 scores.
    """
    if not 0.0 <= drop_rate < 1.0 or not 0.0 <= max_drop_rate < 1.0:
        raise ValueError(f"drop rates must lie in [0, 1), got {drop_rate}, {max_drop_rate}")
    pair_segment = np.asarray(pair_segment, np.int64)
    roots = np.asarray(pair_root, dtype=object)
    if len(roots) != len(pair_segment):
        raise ValueError(f"{len(pair_segment)} pair segments but {len(roots)} roots")
    keep = np.ones(len(roots), bool)
    pair_score = np.zeros(len(roots), np.float32)
    groups: dict[str, np.ndarray] = {}
    for r in dict.fromkeys(roots.tolist()):
        groups[r] = np.flatnonzero(roots == r)
    scores: dict[str, np.ndarray] = {}
    incons: dict[str, float] = {}
    for r, idx in groups.items():
        emb = S[pair_segment[idx]]
        center = np.median(emb, axis=0)
        norm = np.linalg.norm(center)
        center = center / norm if norm > 0 else center
        scores[r] = emb @ center
        pair_score[idx] = scores[r]
        incons[r] = float(np.mean(1.0 - scores[r]))
    w_max = max(incons.values(), default=0.0)
    for r, idx in groups.items():
        rate = max_drop_rate * incons[r] / w_max if adaptive and w_max > 0 else (0.0 if adaptive else drop_rate)
        n_drop = int(np.floor(rate * len(idx) + 1e-9))
        if n_drop:
            order = np.argsort(scores[r], kind="stable")
            keep[idx[order[:n_drop]]] = False
    return (keep, pair_score) if return_scores else keep


def knee_index(sizes_desc: np.ndarray) -> int:
    """Knee of a descending curve (Kneedle, Satopaa et al. 2011): the index where the
    normalised curve lies farthest below the chord from its first to its last point.

    Args:
        sizes_desc: (g,) values sorted in descending order.

    Returns:
        Index in [0, g-1]; 0 when g < 3 or the curve is flat.
    """
    y = np.asarray(sizes_desc, np.float64)
    g = len(y)
    if g < 3 or y[0] == y[-1]:
        return 0
    x = np.linspace(0.0, 1.0, g)
    yn = (y - y[-1]) / (y[0] - y[-1])
    chord = 1.0 - x
    return int(np.argmax(chord - yn))


def ambiguous_roots(group_sizes: dict[str, int], *, min_groups: int = 10) -> list[str]:
    """Roots of abnormally large groups, removed as ambiguous (METHOD.md step 8).

    Group sizes are sorted in descending order and every root before the knee of that curve
    ([`knee_index`][reme.filtering.knee_index]) is returned, e.g. "background", "scene", "image",
    "atmosphere".

    Args:
        group_sizes: root -> number of segments carrying it.
        min_groups: below this many groups nothing is removed (a knee of a handful of points
            is noise; our choice).

    Returns:
        The removed roots, largest group first.
    """
    if len(group_sizes) < min_groups:
        return []
    items = sorted(group_sizes.items(), key=lambda kv: (-kv[1], kv[0]))
    k = knee_index(np.array([v for _, v in items]))
    return [r for r, _ in items[:k]]


def clip_score_filter(clip_scores: np.ndarray, pair_root: Sequence[str] | None = None, *,
                      drop_rate: float = 0.30) -> np.ndarray:
    """Baseline filters the paper compares against (METHOD.md step 7, "compared and worse").

    Drops the pairs with the lowest CLIP pairing score, either globally (``pair_root=None``)
    or within each root-noun group (``floor(drop_rate * size)`` per group).

    Args:
        clip_scores: (p,) float CLIP similarity of each pair (``pair_labels_to_segments``).
        pair_root: p root nouns for the per-group variant; None for the global one.
        drop_rate: fraction dropped, in [0, 1).

    Returns:
        (p,) bool keep-mask.
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must lie in [0, 1), got {drop_rate}")
    s = np.asarray(clip_scores, np.float64)
    keep = np.ones(len(s), bool)
    groups = [np.arange(len(s))] if pair_root is None else \
        [np.flatnonzero(np.asarray(pair_root, object) == r) for r in dict.fromkeys(pair_root)]
    for idx in groups:
        n_drop = int(np.floor(drop_rate * len(idx) + 1e-9))
        if n_drop:
            keep[idx[np.argsort(s[idx], kind="stable")[:n_drop]]] = False
    return keep


def relabel_dropped(S: np.ndarray, pair_segment: np.ndarray, pair_root: Sequence[str], keep: np.ndarray, *,
                    min_similarity: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Relabel instead of drop (the paper's stated limitation, METHOD.md "an opportunity").

    Each dropped pair's segment gets the root whose group centre (element-wise median of the
    kept members' visual embeddings, L2-normalised) it is closest to, when that cosine
    similarity is at least ``min_similarity``; otherwise it stays dropped.

    Args:
        S: (m, d) visual segment embeddings, L2-normalised.
        pair_segment: (p,) row of S per pair.
        pair_root: p root nouns.
        keep: (p,) bool result of a filter.
        min_similarity: threshold on <S_i, S_center> (our default 0.5).

    Returns:
        ``(new_root_index, similarity)``: for each pair, the index into the sorted list of kept
        roots (``sorted(set(kept roots))``) it is relabelled to, or -1 (kept pairs and pairs
        left dropped get -1); and the (p,) float32 best similarity (NaN for kept pairs).
    """
    roots = np.asarray(pair_root, object)
    pair_segment = np.asarray(pair_segment, np.int64)
    kept_roots = sorted(set(roots[keep].tolist()))
    new = np.full(len(roots), -1, np.int64)
    sim_out = np.full(len(roots), np.nan, np.float32)
    gone = np.flatnonzero(~keep)
    if not kept_roots or len(gone) == 0:
        return new, sim_out
    centers = []
    for r in kept_roots:
        c = np.median(S[pair_segment[keep & (roots == r)]], axis=0)
        centers.append(c / max(np.linalg.norm(c), 1e-12))
    sims = S[pair_segment[gone]] @ np.stack(centers).T
    best = sims.argmax(1)
    val = sims[np.arange(len(gone)), best]
    sim_out[gone] = val
    new[gone] = np.where(val >= min_similarity, best, -1)
    return new, sim_out
