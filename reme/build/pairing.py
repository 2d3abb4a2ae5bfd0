"""Initial label-to-segment pairing with CLIP (docs/method.md step 4)."""

from __future__ import annotations

import numpy as np


def pair_labels_to_segments(S: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair each label with its best segment of the same image.

    sim = S L^T (m x n); label j is paired with i*(j) = argmax_i sim_ij. Segments no label
    picked are discarded by the caller (docs/method.md step 4).

    Args:
        S: (m, d) float32 CLIP segment embeddings of one image, L2-normalised.
        L: (n, d) float32 CLIP label embeddings, L2-normalised (template-ensembled).

    Returns:
        ``(best, score)``: (n,) int64 segment index per label, (n,) float32 cosine similarity.

    Raises:
        ValueError: dimension mismatch, or labels given for an image with no segment.
    """
    S = np.ascontiguousarray(S, np.float32)
    L = np.ascontiguousarray(L, np.float32)
    if S.ndim != 2 or L.ndim != 2 or S.shape[1] != L.shape[1]:
        raise ValueError(f"S and L must be (m, d) and (n, d) with the same d, got {S.shape} and {L.shape}")
    if L.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if S.shape[0] == 0:
        raise ValueError("cannot pair labels with an image that has no segment")
    sim = S @ L.T
    best = sim.argmax(axis=0).astype(np.int64)
    return best, sim[best, np.arange(L.shape[0])].astype(np.float32)
