"""FAISS index over S_ref (METHOD.md step 10) for top-k retrieval."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a core dependency
        raise ImportError("the FAISS index needs faiss: pip install faiss-cpu") from exc
    return faiss


def build_index(S_ref: np.ndarray):
    """Exact inner-product index (``IndexFlatIP``) over (m, d) float32 S_ref.

    Inner product equals cosine similarity since rows are L2-normalised.
    """
    faiss = _faiss()
    S = np.ascontiguousarray(S_ref, dtype=np.float32)
    index = faiss.IndexFlatIP(S.shape[1])
    index.add(S)
    return index


def write_index(index, path: str | Path) -> None:
    """Write a FAISS index to ``path``."""
    _faiss().write_index(index, str(path))


def read_index(path: str | Path):
    """Read a FAISS index from ``path``."""
    return _faiss().read_index(str(path))


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours.

    Args:
        index: a FAISS index over S_ref.
        queries: (q, d) float32, L2-normalised.
        k: neighbours per query.

    Returns:
        ``(D, I)``: (q, k) float32 inner products and (q, k) int64 ids, -1 where fewer than
        k reference rows exist (faiss convention).
    """
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
