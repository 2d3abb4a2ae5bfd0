"""Label and score maps between the working size and the input size (eq. 3's output)."""

from __future__ import annotations

import numpy as np
import torch

from reme.io import cell_index


def upsample_nearest(a: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) by nearest neighbour (pixel centres: source row
    ``floor((i + 0.5) h / H)``, `reme.io.cell_index` with ``centre=True``);
    ``a`` itself when the size already matches. Allocates only the output.

    Args:
        a: (h, w) or (h, w, ...) array.
        size_hw: (H, W) target size.

    Returns:
        (H, W, ...) array of ``a``'s dtype.

    Raises:
        ValueError: a target side of 0 while the source has pixels.

    Examples:
        >>> upsample_nearest(np.array([[1, 2]]), (1, 4)).tolist()
        [[1, 1, 2, 2]]
    """
    (h, w), (H, W) = a.shape[:2], size_hw
    if (h, w) == (H, W):
        return a
    rows, cols = cell_index(H, h, centre=True), cell_index(W, w, centre=True)
    return a[rows[:, None], cols[None, :]]


def upsample_scores(p: torch.Tensor, size_hw: tuple[int, int]) -> np.ndarray:
    """(h, w, C) tensor -> (H, W, C) float32 array, bilinear (``align_corners=False``).

    Raises:
        RuntimeError: ``p`` is not (h, w, C) (from torch).
    """
    if tuple(p.shape[:2]) == tuple(size_hw):
        return p.float().cpu().numpy()
    x = p.float().permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x, size=tuple(size_hw), mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).contiguous().cpu().numpy()


def label_fractions(label_map: np.ndarray, n: int, rows: int = 1024) -> np.ndarray:
    """(n,) float64 fraction of the pixels of an (H, W) int label map with each value 0..n-1;
    counted ``rows`` rows at a time (no int64 copy of a large map).

    Raises:
        ValueError: negative labels (from numpy's bincount).

    Examples:
        >>> label_fractions(np.array([[0, 1], [1, 1]]), 3).tolist()
        [0.25, 0.75, 0.0]
    """
    counts = np.zeros(n, np.int64)
    for r in range(0, label_map.shape[0], rows):
        counts += np.bincount(label_map[r:r + rows].ravel(), minlength=n)[:n]
    return counts / max(label_map.size, 1)
