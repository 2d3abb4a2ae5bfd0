"""Semantic enrichment with root-noun synonyms (docs/method.md step 9)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: Similarity rows computed at once: ``block x g`` float32 values (about 64 MiB).
_BLOCK_VALUES = 1 << 24


def head_of(root: str) -> str:
    """The head noun of a root: its last word ("hot dog" -> "dog", "dog" -> "dog").

    Roots keep their compound modifiers before the head (docs/method.md step 3,
    `reme.build.nounphrases`), so the head is the last word.
    """
    return root.rsplit(" ", 1)[-1]


def synonym_pairs(roots: Sequence[str], root_embeddings: np.ndarray, k_sim: int = 30, *,
                  skip_head_pairs: bool = True) -> list[tuple[str, str, float]]:
    """The ``k_sim`` most similar pairs of distinct root nouns.

    All pairwise cosine similarities of the root embeddings are ranked and the top ``k_sim``
    pairs (i < j) are returned as synonyms (k_sim = 30 in the paper). The similarities are
    computed in row blocks (memory O(block x g), not g x g), so 50 000 roots fit.

    With compound-aware roots, a root and a compound of it ("dog" / "hot dog", "bear" /
    "teddy bear", "light" / "traffic light") embed close together although they name different
    things; substituting one for the other would turn "a small dog" into "a small hot dog".
    ``skip_head_pairs`` (default, our choice beyond the paper) leaves out every pair where one
    root is the head (`head_of`) of the other; the next most similar pairs take their
    place, so up to ``k_sim`` pairs are still returned.

    Args:
        roots: g distinct root nouns.
        root_embeddings: (g, d) float32, L2-normalised text embeddings of ``roots``.
        k_sim: number of pairs.
        skip_head_pairs: leave out root / compound-of-root pairs.

    Returns:
        Up to ``k_sim`` tuples ``(root_a, root_b, cosine)`` with a before b in ``roots``, most
        similar first (ties: by a's, then b's position).

    Raises:
        ValueError: duplicate roots, or a row count that differs from ``len(roots)``.
    """
    roots = list(roots)
    if len(set(roots)) != len(roots):
        raise ValueError("roots must be distinct")
    E = np.ascontiguousarray(root_embeddings, np.float32)
    if E.shape[0] != len(roots):
        raise ValueError(f"{len(roots)} roots but {E.shape[0]} embeddings")
    g = len(roots)
    if g < 2 or k_sim <= 0:
        return []
    k = min(k_sim, g * (g - 1) // 2)
    index = {r: i for i, r in enumerate(roots)}
    head_idx = np.array([index.get(head_of(r), i) for i, r in enumerate(roots)], np.int64)   # i: no head root
    has_head = np.flatnonzero(head_idx != np.arange(g))
    block = max(1, _BLOCK_VALUES // g)
    cand_v, cand_i, cand_j = [], [], []
    thr = -np.inf                                      # k-th best value so far: a block needs more to count
    for a in range(0, g - 1, block):
        b = min(a + block, g - 1)
        sim = E[a:b] @ E[a:].T                                               # (b - a, g - a): columns j >= a
        sim[np.arange(g - a)[None, :] <= np.arange(b - a)[:, None]] = -np.inf             # keep j > i
        if skip_head_pairs and len(has_head):
            rows = np.arange(a, b)
            h = head_idx[a:b]
            ok = h >= a
            sim[rows[ok] - a, h[ok] - a] = -np.inf                          # i's head is j
            sel = has_head[(head_idx[has_head] >= a) & (head_idx[has_head] < b) & (has_head >= a)]
            sim[head_idx[sel] - a, sel - a] = -np.inf                        # j's head is i
        flat = sim.ravel()
        top = np.flatnonzero(flat >= thr) if np.isfinite(thr) else np.arange(flat.size)
        if len(top) > k:
            top = top[np.argpartition(-flat[top], k - 1)[:k]]
        top = top[np.isfinite(flat[top])]
        cand_v.append(flat[top])
        cand_i.append(top // (g - a) + a)
        cand_j.append(top % (g - a) + a)
        allv = np.concatenate(cand_v)
        if len(allv) >= k:
            thr = float(np.partition(allv, len(allv) - k)[len(allv) - k])
    v, i, j = (np.concatenate(x) for x in (cand_v, cand_i, cand_j))
    order = np.lexsort((j, i, -v))[:k]
    return [(roots[i[t]], roots[j[t]], float(v[t])) for t in order]
