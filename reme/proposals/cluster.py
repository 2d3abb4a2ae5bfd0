"""Clustering proposals from Split Matching (arXiv 2505.05023), training-free part.

Split Matching discovers unseen-class candidates by clustering CLIP dense features into pseudo
masks and embedding each region with CLS tokens. Here it is an alternative class-agnostic
proposal generator: k-means over the dense features of any visual encoder (CLIP, DINOv2 or the
classical one), each cluster split into connected regions, regions smaller than ``min_size``
pixels merged into the neighbour they share the longest border with. The result is a
partition (segment-id map) like Felzenszwalb's, so mask pooling and eq. 3 apply unchanged.
Region embeddings: mask average pooling (``reme.encoders.pooling``) or the CLS embedding of each region's
masked crop (``cls:`` encoder specs, [`reme.encoders.masked_crop`][reme.encoders.masked_crop], the
SM form; needs a CLIP image tower).
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.measure import label as connected_components

from reme.reference.index import spherical_kmeans
from reme.io import cell_index
from reme.proposals import relabel_sequential


def kmeans(X: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Cosine k-means (k-means++ seeding) of (n, d) rows; returns (n,) int64 cluster ids
    (`reme.reference.index.spherical_kmeans`, shared with the IVF index)."""
    return spherical_kmeans(X, k, iters=iters, seed=seed, init="k-means++")[1]


def _merge_small(seg: np.ndarray, min_size: int) -> np.ndarray:
    seg = relabel_sequential(seg)
    while True:
        k = int(seg.max()) + 1
        area = np.bincount(seg.ravel(), minlength=k)
        small = np.flatnonzero(area < min_size)
        if len(small) == 0 or k == 1:
            return seg
        i = small[np.argmin(area[small])]
        border = np.zeros(k, np.int64)
        for a, b in ((seg[:, :-1], seg[:, 1:]), (seg[:-1, :], seg[1:, :])):
            m = (a == i) & (b != i)
            np.add.at(border, b[m], 1)
            m = (b == i) & (a != i)
            np.add.at(border, a[m], 1)
        seg = relabel_sequential(np.where(seg == i, int(border.argmax()), seg))


def cluster_segments(features: torch.Tensor, image_hw: tuple[int, int], n_clusters: int = 8,
                     min_size: int = 64, seed: int = 0) -> np.ndarray:
    """Clustering proposals (module docstring).

    Args:
        features: (h, w, d) dense features of the image.
        image_hw: (H, W) of the image; clusters are upsampled to it (nearest cell).
        n_clusters: k of k-means (our default 8).
        min_size: regions smaller than this many pixels are merged into a neighbour.
        seed: k-means++ seed (deterministic output).

    Returns:
        (H, W) int32 segment-id map, ids 0..k-1.
    """
    h, w, d = features.shape
    if n_clusters < 1 or min_size < 1:
        raise ValueError(f"n_clusters and min_size must be >= 1, got {n_clusters}, {min_size}")
    assign = kmeans(features.reshape(h * w, d), n_clusters, seed=seed).cpu().numpy().reshape(h, w)
    H, W = image_hw
    full = assign[cell_index(H, h)][:, cell_index(W, w)]
    regions = connected_components(full + 1, background=0, connectivity=1) - 1
    return _merge_small(regions, min_size)
