"""Mask average pooling of dense features (docs/method.md step 6).

S_k = MAP(phi(I), zeta(M_k)): the mask M_k is downsampled to the feature grid as a soft
*coverage* (the fraction of each grid cell it covers, via a nearest-cell assignment of every
pixel), and the grid features are averaged with those weights. A segment smaller than a cell
therefore still gets the feature of the cell it lies in, never an empty average.
"""

from __future__ import annotations

import numpy as np
import torch

from reme.io import cell_index


def _pixel_cells(shape_hw: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) int64 index of the grid cell each pixel falls in (row-major)."""
    (H, W), (h, w) = shape_hw, grid_hw
    rows, cols = cell_index(H, h), cell_index(W, w)
    return rows[:, None] * w + cols[None, :]


def segment_cell_coverage(seg: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """Pixel counts of each segment in each feature-grid cell.

    Args:
        seg: (H, W) int segment-id map, ids 0..k-1 (``reme.proposals``); ids < 0 are ignored.
        grid_hw: (h, w) of the feature grid.

    Returns:
        (k, h*w) float32 counts; row i sums to the area of segment i in pixels.
    """
    k = int(seg.max()) + 1 if seg.size else 0
    n = grid_hw[0] * grid_hw[1]
    cells = _pixel_cells(seg.shape, grid_hw)
    valid = seg >= 0
    flat = seg[valid].astype(np.int64) * n + cells[valid]
    return np.bincount(flat, minlength=k * n).reshape(k, n).astype(np.float32)


def mask_average_pool(features: torch.Tensor, seg: np.ndarray, normalize: bool = True) -> torch.Tensor:
    """Segment embeddings by mask average pooling.

    Args:
        features: (h, w, d) float tensor, the dense map phi(I).
        seg: (H, W) int segment-id map at image resolution (ids 0..k-1).
        normalize: L2-normalise each row (docs/method.md: all embeddings are L2-normalised).

    Returns:
        (k, d) float32 tensor on ``features.device``.
    """
    h, w, d = features.shape
    cov = torch.from_numpy(segment_cell_coverage(seg, (h, w))).to(features.device)
    area = cov.sum(1, keepdim=True).clamp_min(1.0)
    out = (cov / area) @ features.reshape(h * w, d).float()
    if normalize:
        out = torch.nn.functional.normalize(out, dim=1)
    return out


def masks_cell_coverage(masks: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """Pixel counts of each (possibly overlapping) mask in each feature-grid cell, from the
    masks' nonzeros only (no dense float k x H x W copy).

    Args:
        masks: (k, H, W) bool masks M_k.
        grid_hw: (h, w) of the feature grid.

    Returns:
        (k, h*w) float32 counts; row i sums to the area of mask i in pixels.
    """
    k, H, W = masks.shape
    n = grid_hw[0] * grid_hw[1]
    cells = _pixel_cells((H, W), grid_hw).ravel()
    mi, pix = np.nonzero(np.asarray(masks, bool).reshape(k, H * W))
    return np.bincount(mi * n + cells[pix], minlength=k * n).reshape(k, n).astype(np.float32)


def masks_average_pool(features: torch.Tensor, masks: np.ndarray, normalize: bool = True) -> torch.Tensor:
    """Mask average pooling for possibly overlapping masks (SAM proposals).

    Coverage is counted from the masks' nonzeros (`masks_cell_coverage`), so memory is
    O(mask pixels + k h w), not a dense float32 k x H x W matrix.

    Args:
        features: (h, w, d) float tensor.
        masks: (k, H, W) bool masks M_k.
        normalize: L2-normalise rows.

    Returns:
        (k, d) float32 tensor on ``features.device``.
    """
    h, w, d = features.shape
    cov = torch.from_numpy(masks_cell_coverage(masks, (h, w))).to(features.device)
    out = (cov / cov.sum(1, keepdim=True).clamp_min(1.0)) @ features.reshape(h * w, d).float()
    return torch.nn.functional.normalize(out, dim=1) if normalize else out


def embed_proposals(encoder, features: torch.Tensor, proposals, image: np.ndarray | None = None) -> torch.Tensor:
    """Segment embeddings S (docs/method.md step 6) of an image's proposals with ``encoder``.

    The encoder decides how a segment is embedded (``VisualEncoder.segment_embeddings`` /
    ``mask_embeddings``: mask average pooling by default, GFA fusion for ``gfa:`` encoders, CLS
    of masked crops for ``cls:``); objects without those methods get plain mask average pooling.

    Args:
        encoder: the visual encoder that produced ``features``.
        features: (h, w, d') its dense features of ``image``.
        proposals: [`reme.proposals.Proposals`][reme.proposals.Proposals] (a partition, or
            overlapping masks).
        image: the (H, W, 3) uint8 image (needed by ``cls:`` encoders).

    Returns:
        (k, d) float32 tensor, rows L2-normalised.
    """
    if proposals.masks is not None:
        fn = getattr(encoder, "mask_embeddings", None)
        return fn(features, proposals.masks, image=image) if callable(fn) else masks_average_pool(features, proposals.masks)
    fn = getattr(encoder, "segment_embeddings", None)
    seg = proposals.segment_ids
    return fn(features, seg, image=image) if callable(fn) else mask_average_pool(features, seg)
