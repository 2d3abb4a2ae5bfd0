"""GFA random-walk fusion (OVSNet) without training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reme.encoders.gfa import gfa_fuse, propagate, random_walk_matrix, segment_adjacency, smooth_segment_probs


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_closed_form_equals_iteration():
    rng = np.random.default_rng(0)
    FC, FQ = _unit(rng.normal(size=(12, 8))), _unit(rng.normal(size=(12, 8)))
    A = random_walk_matrix(FC, FQ, lam=5.0)
    assert torch.allclose(A.sum(1), torch.ones(12), atol=1e-5) and (A >= 0).all()
    F0 = torch.tensor(FC, dtype=torch.float32)
    F = F0.clone()
    for _ in range(200):
        F = 0.6 * A @ F + 0.4 * F0
    torch.testing.assert_close(propagate(A, F0, 0.6), F, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(propagate(A, F0, 0.0), F0)
    with pytest.raises(ValueError):
        propagate(A, F0, 1.0)


def test_fusion_pulls_noisy_region_towards_its_cluster():
    """Two clusters agree in both modalities; one region's F_C is very noisy, its F_Q clean."""
    rng = np.random.default_rng(1)
    ca, cb = _unit(rng.normal(size=(2, 16)))
    FC = _unit(np.concatenate([ca + 0.1 * rng.normal(size=(6, 16)), cb + 0.1 * rng.normal(size=(6, 16))]))
    FQ = FC.copy()
    FC[0] = _unit(ca[None] + 0.5 * rng.normal(size=(1, 16)))[0]   # noisy CLIP view of region 0
    fused = gfa_fuse(FC, FQ, omega=0.8, lam=5.0, affinity="mean").numpy()
    assert fused[0] @ ca > FC[0] @ ca + 0.3
    mild = FC.copy()
    mild[0] = _unit(ca[None] + 0.25 * rng.normal(size=(1, 16)))[0]
    fused = gfa_fuse(mild, FQ, omega=0.5, lam=5.0).numpy()                  # OVSNet cross form
    assert fused[0] @ ca > mild[0] @ ca
    with pytest.raises(ValueError, match="same n regions"):
        random_walk_matrix(FC, FQ[:5])
    assert gfa_fuse(FC, _unit(rng.normal(size=(12, 7)))).shape == (12, 16)  # different dims


def test_smoothing_over_segment_graph_fixes_an_isolated_error():
    seg = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    adj = segment_adjacency(seg)
    assert adj[0, 1] and adj[0, 2] and not adj[0, 3] and not adj.diagonal().any()
    P = torch.tensor([[0.1, 0.9], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # segment 0 disagrees
    out = smooth_segment_probs(P, seg, omega=0.7)
    assert out[0].argmax() == 0 and out[1:].argmax(1).eq(0).all()
    with pytest.raises(ValueError):
        smooth_segment_probs(P[:3], seg)
