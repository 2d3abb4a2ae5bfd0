"""Clustering proposals (Split Matching) on constructed features and a real photo."""

from __future__ import annotations

import numpy as np
import torch

from conftest import TINY_CLIP, photo
from reme.proposals_cluster import cls_region_embeddings, cluster_segments, kmeans


def test_kmeans_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 10))
    X = np.concatenate([c + 0.05 * rng.normal(size=(20, 10)) for c in centers])
    a = kmeans(torch.tensor(X), 3).numpy()
    for g in range(3):
        assert len(set(a[g * 20:(g + 1) * 20])) == 1
    assert len(set(a)) == 3


def test_cluster_segments_split_disconnected_regions_and_merge_small():
    feats = torch.zeros(8, 8, 2)
    feats[..., 0] = 1.0
    feats[:, :2, :] = torch.tensor([0.0, 1.0])   # left stripe: cluster B
    feats[:, 6:, :] = torch.tensor([0.0, 1.0])   # right stripe: cluster B again, disconnected
    feats[0, 4, :] = torch.tensor([0.0, 1.0])    # a single-cell island (4x4 px after upsampling)
    seg = cluster_segments(feats, (32, 32), n_clusters=2, min_size=20)
    assert seg.shape == (32, 32) and seg.dtype == np.int32
    assert seg.max() + 1 == 3, "two B stripes + the A middle; the island merged away"
    assert seg[0, 0] != seg[0, 31] and seg[0, 16] == seg[10, 16]


def test_cluster_segments_on_a_real_photo(classical):
    img = photo("coffee")
    seg = cluster_segments(classical.dense_features(img), img.shape[:2], n_clusters=6, min_size=200)
    areas = np.bincount(seg.ravel())
    assert seg.max() >= 5 and areas.min() >= 200 and set(np.unique(seg)) == set(range(seg.max() + 1))


def test_cls_region_embeddings_with_tiny_clip(tiny_clip):
    from reme.encoders import resolve_encoder

    ckpt, _ = tiny_clip
    clip = resolve_encoder(f"clip:{TINY_CLIP}:{ckpt}", device="cpu")
    img = photo("astronaut")[:128, :128]
    seg = np.zeros((128, 128), np.int32)
    seg[:, 64:] = 1
    emb = cls_region_embeddings(clip, img, seg)
    assert emb.shape == (2, clip.dim) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])
