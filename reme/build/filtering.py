"""Reference-set cleaning: group-median filter and ambiguous-label knee filter
(docs/method.md steps 7 and 8).

Both work on *pairs* (segment index, root noun): a pair is a label attached to a segment.

Embeddings are read through one accessor, so the same functions serve an in-memory (m, d) array
and a build's shards (`reme.build._global_stages.ShardReader`, any object with
``embeddings(sorted_unique_rows) -> (n, d) float32``): groups are packed into passes of at most
``budget_rows`` member rows and only the segments of one pass are read at a time. A single group
larger than the budget is read as one pass (its median needs all its members). The arithmetic
is the same whatever the budget, so a build and an in-memory call give the same result.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def group_slices(keys) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group equal keys once: ``np.unique(return_inverse=True)`` + a stable argsort, O(p log p)
    instead of one pass over all pairs per group.

    Args:
        keys: (p,) array-like of group keys (root strings or integer ids).

    Returns:
        ``(group_of, order, bounds)``: (p,) int64 group index of each pair (groups numbered
        in sorted key order), (p,) int64 pair indices sorted by group (pair order kept inside
        a group), and (G + 1,) int64 offsets: group r's pairs are ``order[bounds[r]:bounds[r + 1]]``.
    """
    keys = np.asarray(keys)
    if keys.dtype == object:
        keys = keys.astype(str) if len(keys) else np.zeros(0, str)
    _, group_of = np.unique(keys, return_inverse=True)
    group_of = group_of.ravel().astype(np.int64)
    order = np.argsort(group_of, kind="stable")
    n = int(group_of.max()) + 1 if len(group_of) else 0
    bounds = np.searchsorted(group_of[order], np.arange(n + 1)).astype(np.int64)
    return group_of, order, bounds


def group_drop_rates(inconsistency: np.ndarray, *, drop_rate: float = 0.30, adaptive: bool = False,
                     max_drop_rate: float = 0.50) -> np.ndarray:
    """Drop rate of each group (docs/method.md step 7): ``drop_rate`` (delta_filter) for all, or,
    ``adaptive``, ``max_drop_rate * w / max_g w_g`` with w the group's inconsistency
    mean_i(1 - <S_i, S_center>) (the most inconsistent group drops ``max_drop_rate``, a perfectly
    consistent one nothing; range [0, 50 %] in the paper, the scaling is our choice).

    Args:
        inconsistency: (G,) float w of each group (only used when ``adaptive``).

    Returns:
        (G,) float64 rates in [0, 1).

    Raises:
        ValueError: a rate outside [0, 1).
    """
    if not 0.0 <= drop_rate < 1.0 or not 0.0 <= max_drop_rate < 1.0:
        raise ValueError(f"drop rates must lie in [0, 1), got {drop_rate}, {max_drop_rate}")
    w = np.asarray(inconsistency, np.float64)
    if not adaptive:
        return np.full(len(w), drop_rate)
    w_max = float(w.max()) if len(w) else 0.0
    return max_drop_rate * w / w_max if w_max > 0 else np.zeros(len(w))


def drop_lowest(scores: np.ndarray, order: np.ndarray, bounds: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Keep-mask that drops, in each group, the ``floor(rate * size)`` lowest-scored pairs (ties:
    the earlier pair goes first), the drop rule of step 7 and its CLIP-score baselines.

    Args:
        scores: (p,) pair scores. order, bounds: from `group_slices`.
        rates: (G,) drop rate of each group.

    Returns:
        (p,) bool, True for pairs kept.
    """
    keep = np.ones(len(scores), bool)
    sizes = np.diff(bounds)
    n_drop = np.floor(np.asarray(rates, np.float64) * sizes + 1e-9).astype(np.int64)
    for r in np.flatnonzero(n_drop):
        idx = order[bounds[r]:bounds[r + 1]]
        keep[idx[np.argsort(scores[idx], kind="stable")[:n_drop[r]]]] = False
    return keep


def _embedding_reader(S) -> Callable[[np.ndarray], np.ndarray]:
    """``rows -> (len(rows), d) float32``: a reader's ``embeddings`` or rows of an array."""
    if hasattr(S, "embeddings"):
        return S.embeddings
    S = np.asarray(S)
    return lambda rows: np.asarray(S[rows], np.float32)


def _passes(sizes: np.ndarray, budget_rows: int) -> list[tuple[int, int]]:
    """Consecutive group ranges [a, b) whose total size is <= budget (a lone group may exceed it)."""
    out, a, acc = [], 0, 0
    for r, n in enumerate(sizes.tolist()):
        if r > a and acc + n > budget_rows:
            out.append((a, r))
            a, acc = r, 0
        acc += n
    if a < len(sizes):
        out.append((a, len(sizes)))
    return out


def _pass_embeddings(read, pair_segment: np.ndarray, order: np.ndarray, bounds: np.ndarray, budget_rows: int, *,
                     desc: str, progress: bool = False) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(a, b, pair indices of groups a..b-1 in group order, their (len, d) embeddings,
    (b - a + 1,) local group offsets)`` per pass of at most ``budget_rows`` member rows (a lone
    larger group is read whole). ``order``/``bounds`` from `group_slices`."""
    bar = tqdm(total=len(bounds) - 1, desc=desc, unit="group", disable=not progress)
    for a, b in _passes(np.diff(bounds), budget_rows):
        idx = order[bounds[a]:bounds[b]]
        segs = np.unique(pair_segment[idx])
        E = read(segs)
        yield a, b, idx, E[np.searchsorted(segs, pair_segment[idx])], bounds[a:b + 1] - bounds[a]
        bar.update(b - a)
        del E
    bar.close()


def _check_budget(budget_rows: int | None, p: int) -> int:
    if budget_rows is None:
        return max(p, 1)
    if budget_rows < 1:
        raise ValueError(f"budget_rows must be >= 1, got {budget_rows}")
    return int(budget_rows)


def group_median_filter(S, pair_segment: np.ndarray, pair_root: Sequence, *, drop_rate: float = 0.30,
                        adaptive: bool = False, max_drop_rate: float = 0.50, return_scores: bool = False,
                        budget_rows: int | None = None, progress: bool = False):
    """Keep-mask of pairs after group-based filtering (docs/method.md step 7), the one implementation
    used by the build, the ablation runner and in-memory callers.

    Pairs are grouped by root noun. Per group, S_center is the element-wise median of the
    members' visual embeddings; members are scored by <S_i, S_center> and the lowest
    ``drop_rate`` fraction of each group is dropped (delta_filter = 30 % in the paper;
    ``floor(drop_rate * size)`` members, so groups of 1-3 lose nothing at 30 %).

    Adaptive variant (``adaptive=True``, better in the paper): per-group rates from
    `group_drop_rates`.

    Grouping is done once (`group_slices`), so the cost is O(p log p + p d), not one
    scan of all pairs per group; embeddings are read group by group in passes of at most
    ``budget_rows`` rows (module docstring).

    Args:
        S: (m, d) float visual segment embeddings, L2-normalised, or a reader with
            ``embeddings(rows)`` (a build's shards).
        pair_segment: (p,) int row of S for each pair.
        pair_root: p root nouns (or integer root ids).
        drop_rate: fixed fraction in [0, 1) dropped per group.
        adaptive: use the adaptive per-group rate.
        max_drop_rate: upper end of the adaptive range.
        return_scores: also return each pair's score <S_i, S_center>.
        budget_rows: member rows read per pass (None: all in one pass).
        progress: progress bar over groups.

    Returns:
        (p,) bool, True for pairs kept; with ``return_scores``, also (p,) float32 scores.

    Raises:
        ValueError: a rate outside [0, 1), ``budget_rows`` < 1, or ``pair_root`` and
            ``pair_segment`` lengths differ.
    """
    group_drop_rates(np.zeros(0), drop_rate=drop_rate, max_drop_rate=max_drop_rate)      # validates the rates
    pair_segment = np.asarray(pair_segment, np.int64)
    if len(pair_root) != len(pair_segment):
        raise ValueError(f"{len(pair_segment)} pair segments but {len(pair_root)} roots")
    budget = _check_budget(budget_rows, len(pair_segment))
    _, order, bounds = group_slices(pair_root)
    scores = np.zeros(len(pair_segment), np.float32)
    incons = np.zeros(len(bounds) - 1, np.float64)
    for a, b, idx, emb, lb in _pass_embeddings(_embedding_reader(S), pair_segment, order, bounds, budget,
                                               desc="group filter", progress=progress):
        scores[idx], incons[a:b] = grouped_median_scores(emb, lb)
    rates = group_drop_rates(incons, drop_rate=drop_rate, adaptive=adaptive, max_drop_rate=max_drop_rate)
    keep = drop_lowest(scores, order, bounds, rates)
    return (keep, scores) if return_scores else keep


def grouped_median_scores(emb: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`median_scores` of consecutive groups: rows ``bounds[r]:bounds[r + 1]`` of ``emb``
    form group r. One-member groups (most root groups of a Zipf vocabulary) are scored in one
    vectorised step (their centre is the row itself, the score its norm).

    Args:
        emb: (p, d) float32 embeddings, grouped. bounds: (G + 1,) int offsets.

    Returns:
        (p,) float32 scores and (G,) float64 inconsistencies.
    """
    emb = np.asarray(emb, np.float32)
    sizes = np.diff(bounds)
    sc = np.zeros(len(emb), np.float32)
    incons = np.zeros(len(sizes), np.float64)
    one = np.flatnonzero(sizes == 1)
    if len(one):
        e = emb[bounds[one]]
        n = np.linalg.norm(e, axis=1)
        s1 = np.einsum("ij,ij->i", e, e / np.where(n > 0, n, 1.0)[:, None]).astype(np.float32)
        sc[bounds[one]] = s1
        incons[one] = 1.0 - s1.astype(np.float64)
    for r in np.flatnonzero(sizes > 1):
        a, b = bounds[r], bounds[r + 1]
        sc[a:b], incons[r] = median_scores(emb[a:b])
    return sc, incons


def median_scores(emb: np.ndarray) -> tuple[np.ndarray, float]:
    """Scores <S_i, S_center> of one group's (n, d) embeddings against their element-wise median
    (L2-normalised), and the group's inconsistency mean_i(1 - score) (docs/method.md step 7)."""
    center = emb[0] if len(emb) == 1 else np.median(emb, axis=0)         # a one-row median is the row
    norm = np.linalg.norm(center)
    center = center / norm if norm > 0 else center
    sc = (emb @ center).astype(np.float32)
    return sc, float(np.mean(1.0 - sc))


#: Defaults of the ambiguous-label knee filter (docs/method.md step 8); our choices, the notes give
#: no numbers. See `knee_index` and `ambiguous_roots`.
KNEE_MIN_RATIO = 3.0
KNEE_MAX_RANK = 20
KNEE_MAX_REMOVED_SHARE = 0.5


def knee_index(sizes_desc: np.ndarray, *, min_ratio: float = KNEE_MIN_RATIO, max_rank: int = KNEE_MAX_RANK) -> int:
    """Knee of a descending group-size curve on the log scale (docs/method.md step 8).

    The knee is the steepest drop of ``log(size)`` between consecutive ranks among the top
    ``max_rank`` groups: the ``k`` maximising ``log(s_k / s_{k+1})`` (1-based ranks). The
    groups before it are "abnormally large" when that drop is at least ``min_ratio``, i.e.
    the k-th group is at least ``min_ratio`` times the (k+1)-th; otherwise there is no knee.

    Why log sizes, not Kneedle (Satopaa et al. 2011) on linear sizes: caption root groups
    follow Zipf's law (size ~ rank^-a, a ~ 1-1.2). On linear sizes Kneedle puts the knee of any
    Zipf curve near rank sqrt(g) (about 70 of 5000 groups, 35-70 % of all pairs), removing the
    largest *real* classes. On the log scale a Zipf curve has no cliff: consecutive ratios are
    ((k+1)/k)^a <= 2^a (2.3 at a = 1.2, below the default ``min_ratio`` 3), so only groups far
    above the power law (e.g. "image" in every LLaVA caption) are cut.

    Args:
        sizes_desc: (g,) positive group sizes sorted in descending order.
        min_ratio: smallest size ratio across the knee (> 1; default 3, our choice).
        max_rank: the knee is searched among the first ``max_rank`` groups (default 20,
            our choice: ambiguous roots are a handful of the largest groups).

    Returns:
        The number of leading groups before the knee, in [0, min(max_rank, g - 1)]; 0 when
        g < 2 or no drop reaches ``min_ratio``.

    Raises:
        ValueError: ``min_ratio`` <= 1, ``max_rank`` < 1 or a size <= 0.
    """
    if min_ratio <= 1.0 or max_rank < 1:
        raise ValueError(f"need min_ratio > 1 and max_rank >= 1, got {min_ratio}, {max_rank}")
    y = np.asarray(sizes_desc, np.float64)
    if len(y) and y.min() <= 0:
        raise ValueError("group sizes must be positive")
    K = min(max_rank, len(y) - 1)
    if K < 1:
        return 0
    y = np.log(y)
    gaps = y[:K] - y[1:K + 1]
    k = int(np.argmax(gaps))
    return k + 1 if gaps[k] >= np.log(min_ratio) - 1e-12 else 0


def knee_cut(group_sizes: dict[str, int], *, min_groups: int = 10, min_ratio: float = KNEE_MIN_RATIO,
             max_rank: int = KNEE_MAX_RANK, max_removed_share: float = KNEE_MAX_REMOVED_SHARE) -> dict:
    """The knee filter's decision with its numbers (docs/method.md step 8), as recorded in a
    build's manifest.

    Groups are sorted by size (descending, then by name), the knee is found on the log sizes
    (`knee_index`), and the groups before it are removed, largest first, as long as the
    removed groups hold at most ``max_removed_share`` of all pairs (sum of sizes); when the
    knee asks for more, the cut stops at the last group within the cap and a warning is logged.

    Args:
        group_sizes: root -> number of segments carrying it.
        min_groups: below this many groups nothing is removed (our choice).
        min_ratio, max_rank: see `knee_index`.
        max_removed_share: cap on the removed share of pairs, in [0, 1] (default 0.5, our
            choice: the step never removes more than half of the reference's pairs).

    Returns:
        dict with ``removed`` (roots, largest first), ``knee_rank`` (the knee before the cap),
        ``removed_share`` (share of pairs removed, in [0, 1]), ``capped`` (bool) and the
        parameters ``min_ratio``, ``max_rank``, ``max_removed_share``, ``min_groups``.
    """
    if not 0.0 <= max_removed_share <= 1.0:
        raise ValueError(f"max_removed_share must lie in [0, 1], got {max_removed_share}")
    out = {"method": "log-size ratio", "min_ratio": float(min_ratio), "max_rank": int(max_rank),
           "max_removed_share": float(max_removed_share), "min_groups": int(min_groups), "knee_rank": 0,
           "removed": [], "removed_share": 0.0, "capped": False}
    if len(group_sizes) < min_groups:
        return out
    items = sorted(group_sizes.items(), key=lambda kv: (-kv[1], kv[0]))
    sizes = np.array([v for _, v in items], np.float64)
    k = knee_index(sizes, min_ratio=min_ratio, max_rank=max_rank)
    share = np.cumsum(sizes) / max(sizes.sum(), 1.0)
    k_cap = int(np.searchsorted(share[:k], max_removed_share + 1e-12, side="right"))
    if k_cap < k:
        logger.warning("knee filter: the %d groups before the knee hold %.0f %% of the pairs, above the cap of "
                       "%.0f %%; removing only the %d largest", k, 100 * share[k - 1], 100 * max_removed_share, k_cap)
    out.update(knee_rank=k, removed=[r for r, _ in items[:k_cap]], capped=k_cap < k,
               removed_share=float(share[k_cap - 1]) if k_cap else 0.0)
    return out


def ambiguous_roots(group_sizes: dict[str, int], *, min_groups: int = 10, min_ratio: float = KNEE_MIN_RATIO,
                    max_rank: int = KNEE_MAX_RANK, max_removed_share: float = KNEE_MAX_REMOVED_SHARE) -> list[str]:
    """Roots of abnormally large groups, removed as ambiguous (docs/method.md step 8), e.g.
    "background", "scene", "image", "atmosphere": ``knee_cut(...)["removed"]``.

    Args:
        group_sizes: root -> number of segments carrying it.
        min_groups, min_ratio, max_rank, max_removed_share: see `knee_cut`.

    Returns:
        The removed roots, largest group first.
    """
    return knee_cut(group_sizes, min_groups=min_groups, min_ratio=min_ratio, max_rank=max_rank,
                    max_removed_share=max_removed_share)["removed"]


def clip_score_filter(clip_scores: np.ndarray, pair_root: Sequence[str] | None = None, *,
                      drop_rate: float = 0.30) -> np.ndarray:
    """Baseline filters the paper compares against (docs/method.md step 7, "compared and worse").

    Drops the pairs with the lowest CLIP pairing score, either globally (``pair_root=None``)
    or within each root-noun group (``floor(drop_rate * size)`` per group, grouped once with
    `group_slices`).

    Args:
        clip_scores: (p,) float CLIP similarity of each pair (``pair_labels_to_segments``).
        pair_root: p root nouns (or integer root ids) for the per-group variant; None for the
            global one.
        drop_rate: fraction dropped, in [0, 1).

    Returns:
        (p,) bool keep-mask.
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must lie in [0, 1), got {drop_rate}")
    s = np.asarray(clip_scores, np.float64)
    if pair_root is None:
        order, bounds = np.arange(len(s)), np.array([0, len(s)], np.int64)
    else:
        _, order, bounds = group_slices(pair_root)
    return drop_lowest(s, order, bounds, np.full(len(bounds) - 1, drop_rate))


def relabel_dropped(S, pair_segment: np.ndarray, pair_root: Sequence, keep: np.ndarray, *,
                    min_similarity: float = 0.5, budget_rows: int | None = None,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Relabel instead of drop (the paper's stated limitation, docs/method.md "beyond the paper").

    Each dropped pair's segment gets the root whose group centre (element-wise median of the
    kept members' visual embeddings, L2-normalised) it is closest to, when that cosine
    similarity is at least ``min_similarity``; otherwise it stays dropped. Embeddings are read
    in passes of at most ``budget_rows`` rows: pass 1 forms the centres group by group, pass 2
    scores the dropped pairs against all centres ``budget_rows`` pairs at a time.

    Args:
        S: (m, d) visual segment embeddings, L2-normalised, or a reader with
            ``embeddings(rows)`` (a build's shards).
        pair_segment: (p,) row of S per pair.
        pair_root: p root nouns (or integer root ids).
        keep: (p,) bool result of a filter.
        min_similarity: threshold on <S_i, S_center> (our default 0.5).
        budget_rows: embeddings read per pass (None: all at once).
        progress: progress bars.

    Returns:
        ``(new_root_index, similarity)``: for each pair, the index into the sorted list of kept
        roots (``sorted(set(kept roots))``) it is relabelled to, or -1 (kept pairs and pairs
        left dropped get -1); and the (p,) float32 best similarity (NaN for kept pairs).

    Raises:
        ValueError: ``budget_rows`` < 1.
    """
    roots = np.asarray(pair_root)
    pair_segment = np.asarray(pair_segment, np.int64)
    keep = np.asarray(keep, bool)
    new = np.full(len(roots), -1, np.int64)
    sim_out = np.full(len(roots), np.nan, np.float32)
    gone = np.flatnonzero(~keep)
    kept = np.flatnonzero(keep)
    budget = _check_budget(budget_rows, len(roots))
    if len(kept) == 0 or len(gone) == 0:
        return new, sim_out
    read = _embedding_reader(S)
    _, order, bounds = group_slices(roots[kept])                 # groups in sorted root order
    centers = None
    for a, b, _, emb, lb in _pass_embeddings(read, pair_segment[kept], order, bounds, budget,
                                             desc="relabel centres", progress=progress):
        if centers is None:
            centers = np.zeros((len(bounds) - 1, emb.shape[1]), np.float32)
        for r in range(a, b):
            c = np.median(emb[lb[r - a]:lb[r - a + 1]], axis=0)
            centers[r] = c / max(np.linalg.norm(c), 1e-12)
    for s in tqdm(range(0, len(gone), budget), desc="relabel dropped", disable=not progress):
        idx = gone[s:s + budget]
        segs, inv = np.unique(pair_segment[idx], return_inverse=True)
        sims = read(segs)[inv.ravel()] @ centers.T
        best = sims.argmax(1)
        val = sims[np.arange(len(idx)), best]
        sim_out[idx] = val
        new[idx] = np.where(val >= min_similarity, best, -1)
    return new, sim_out
