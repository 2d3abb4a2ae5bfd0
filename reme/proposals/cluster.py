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

import faiss
import numpy as np
import torch
from skimage.measure import label as connected_components
from skimage.segmentation import relabel_sequential

from reme.io import cell_index


def kmeans(X: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Cosine k-means of (n, d) rows: k-means++ seeding on the cosine distance (Arthur &
    Vassilvitskii 2007), then ``faiss.Kmeans(spherical=True)`` Lloyd iterations from those seeds.

    faiss's own random seeding needs 5 restarts (``nredo``) to reach the k-means++ objective on
    8 clusters of image features, 5-10x the time (report of issue 21), hence the seeding here.

    Args:
        X: (n, d) float rows (any device; moved to the CPU).
        k: clusters, clipped to [1, n].
        iters: Lloyd iterations.
        seed: seeding seed (deterministic output).

    Returns:
        (n,) int64 cluster of each row (nearest centroid by inner product).

    Raises:
        ValueError: X has no rows.
    """
    n = X.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one row")
    k = max(1, min(int(k), n))
    Xn = torch.nn.functional.normalize(X.detach().float().cpu(), dim=1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = [int(torch.randint(n, (1,), generator=g).item())]
    dmin = (1 - Xn[idx[0]] @ Xn.T).clamp_min(0)                   # cosine distance to the nearest seed
    for _ in range(1, k):
        p = dmin ** 2
        p = p / p.sum() if p.sum() > 0 else torch.full((n,), 1.0 / n)
        idx.append(int(torch.multinomial(p, 1, generator=g).item()))
        dmin = torch.minimum(dmin, (1 - Xn[idx[-1]] @ Xn.T).clamp_min(0))
    x = np.ascontiguousarray(Xn.numpy())
    km = faiss.Kmeans(x.shape[1], k, niter=int(iters), seed=int(seed), spherical=True, min_points_per_centroid=1,
                      max_points_per_centroid=n, verbose=False)
    km.train(x, init_centroids=np.ascontiguousarray(x[idx]))
    return torch.from_numpy(np.asarray(km.index.search(x, 1)[1][:, 0], np.int64))


def _sequential(seg: np.ndarray) -> np.ndarray:
    """Values of a label map renumbered 0..k-1 in sorted order, (H, W) int32."""
    return relabel_sequential(seg - seg.min())[0].astype(np.int32)


def _merge_small(seg: np.ndarray, min_size: int) -> np.ndarray:
    seg = _sequential(seg)
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
        seg = _sequential(np.where(seg == i, int(border.argmax()), seg))


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
