"""Semantic enrichment with root-noun synonyms (METHOD.md step 9)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def synonym_pairs(roots: Sequence[str], root_embeddings: np.ndarray, k_sim: int = 30) -> list[tuple[str, str, float]]:
    """The ``k_sim`` most similar pairs of distinct root nouns.

    All pairwise cosine similarities of the root embeddings are ranked and the top ``k_sim``
    pairs (i < j) are returned as synonyms (k_sim = 30 in the paper).

    Args:
        roots: g distinct root nouns.
        root_embeddings: (g, d) float32, L2-normalised text embeddings of ``roots``.
        k_sim: number of pairs.

    Returns:
        Up to ``k_sim`` tuples ``(root_a, root_b, cosine)``, most similar first.
    """
    roots = list(roots)
    if len(set(roots)) != len(roots):
        raise ValueError("roots must be distinct")
    E = np.asarray(root_embeddings, np.float32)
    if E.shape[0] != len(roots):
        raise ValueError(f"{len(roots)} roots but {E.shape[0]} embeddings")
    g = len(roots)
    if g < 2 or k_sim <= 0:
        return []
    sim = E @ E.T
    iu, ju = np.triu_indices(g, k=1)
    vals = sim[iu, ju]
    k = min(k_sim, len(vals))
    top = np.argpartition(-vals, k - 1)[:k]
    top = top[np.lexsort((iu[top], -vals[top]))]
    return [(roots[iu[t]], roots[ju[t]], float(vals[t])) for t in top]
