"""Mask average pooling of overlapping masks from their nonzeros (issue 13)."""

from __future__ import annotations

import numpy as np
import torch

from reme.encoders.pooling import _pixel_cells, mask_average_pool, masks_average_pool, masks_cell_coverage


def dense_formula(features: torch.Tensor, masks: np.ndarray) -> torch.Tensor:
    """The former implementation: a dense float32 (k, H*W) mask matrix summed into grid cells."""
    k, H, W = masks.shape
    h, w, d = features.shape
    cells = torch.from_numpy(_pixel_cells((H, W), (h, w)).ravel())
    m = torch.from_numpy(masks.reshape(k, H * W)).float()
    cov = torch.zeros(k, h * w).index_add_(1, cells, m)
    out = (cov / cov.sum(1, keepdim=True).clamp_min(1.0)) @ features.reshape(h * w, d).float()
    return torch.nn.functional.normalize(out, dim=1)


def test_sparse_pooling_equals_dense_formula():
    rng = np.random.default_rng(0)
    H, W, h, w, d, k = 61, 83, 7, 9, 12, 15
    feats = torch.from_numpy(rng.normal(size=(h, w, d)).astype(np.float32))
    yy, xx = np.mgrid[:H, :W]
    cy, cx, r = rng.integers(0, H, k), rng.integers(0, W, k), rng.integers(2, 30, k)
    masks = ((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) < r[:, None, None] ** 2
    masks[3] = False                                             # an empty mask
    masks[4, 10, 10], masks[4, 11:, :] = True, False             # a one-pixel mask
    masks[4, :10] = False
    got = masks_average_pool(feats, masks)
    np.testing.assert_allclose(got.numpy(), dense_formula(feats, masks).numpy(), atol=1e-6)
    cov = masks_cell_coverage(masks, (h, w))
    np.testing.assert_array_equal(cov.sum(1), masks.reshape(k, -1).sum(1))
    assert cov[3].sum() == 0 and cov[4].sum() == 1
    # a partition pools the same through either path
    seg = (yy // 20) * 5 + xx // 20
    part = np.stack([seg == i for i in range(int(seg.max()) + 1)])
    np.testing.assert_allclose(masks_average_pool(feats, part).numpy(), mask_average_pool(feats, seg).numpy(),
                               atol=1e-6)
