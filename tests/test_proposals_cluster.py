"""Clustering proposals (Split Matching) on constructed features and a real photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_CLIP, photo
from reme.encoders.masked_crop import cls_region_embeddings
from reme.proposals.cluster import cluster_segments, kmeans


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


def test_cls_encoder_spec_in_build_and_segmenter(tiny_clip, tmp_path):
    """``cls:CLIPSPEC`` embeds every segment as the CLS embedding of its masked crop, in the
    build (S_ref) and at inference (S_test, rebuilt from the manifest)."""
    from reme.build.pipeline import build_gt_reference
    from reme.encoders import resolve_encoder
    from reme.encoders.masked_crop import MaskedCropEncoder, masked_crops
    from reme.inference.segmenter import Segmenter
    from test_build_resume import HashText, make_dataset

    ckpt, _ = tiny_clip
    enc = resolve_encoder(f"cls:clip:{TINY_CLIP}:{ckpt}", device="cpu")
    assert isinstance(enc, MaskedCropEncoder) and enc.spec == f"cls:{enc.clip.spec}" and enc.dim == 32
    img = photo("astronaut")[:96, :128]
    seg = np.zeros((96, 128), np.int32)
    seg[:, 64:], seg[60:, :30] = 1, 2
    feats = enc.dense_features(img)
    S = enc.segment_embeddings(feats, seg, image=img)
    np.testing.assert_allclose(S.numpy(), cls_region_embeddings(enc.clip, img, seg), atol=1e-6)
    masks = np.stack([seg == i for i in range(3)])
    np.testing.assert_allclose(enc.mask_embeddings(feats, masks, image=img).numpy(), S.numpy(), atol=1e-6)
    crop = masked_crops(img, masks[2:])[0]
    assert crop.shape == (36, 30, 3) and (crop == img[60:, :30]).all()       # bounding box, all inside
    assert (masked_crops(img, masks[:1])[0][60:, :30] == 0).all()            # segment 2 filled in crop 0
    with pytest.raises(ValueError, match="need the image"):
        enc.segment_embeddings(feats, seg)
    with pytest.raises(ValueError, match="cannot be parts"):
        resolve_encoder(f"gfa:classical+cls:clip:{TINY_CLIP}:{ckpt}", device="cpu")

    imgs, ann = make_dataset(tmp_path / "data", n=2, size=(48, 64))
    ref = build_gt_reference(imgs, ann, enc, HashText(), out=tmp_path / "ref", segments="masks", progress=False)
    assert ref.manifest["encoders"]["visual"] == enc.spec
    sgm = Segmenter(tmp_path / "ref", text_encoder=HashText(), device="cpu", proposals="cluster", n_clusters=3)
    assert sgm.visual_encoder.spec == enc.spec
    res = sgm.predict(imgs / "img00.png", ["dark", "bright"])
    assert res.label_map.shape == (48, 64) and res.segment_scores.shape[1] == 2
