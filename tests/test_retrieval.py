"""Eqs. 1-3 (docs/method.md Part 2) against a direct NumPy transcription of the paper's Alg. A1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reme.proposals import masks_from_segment_ids
from reme.inference.retrieval import (
    label_affinity,
    pixel_class_scores,
    pixel_class_scores_masks,
    reference_class_scores,
    segment_class_scores,
    segment_label_affinity,
)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def paper_alg_a1(S_test, S_ref, O_ref, L_ref, L_test, masks, t1=1.0, t2=1.0):
    """Literal transcription: A1, A2, P_seg, P_test, label (float64)."""
    A1 = _softmax(t1 * S_test @ S_ref.T, axis=1) @ O_ref
    A2 = _softmax(t2 * L_ref @ L_test.T, axis=1)
    P_seg = A1 @ A2
    P_test = np.einsum("ij,ixy->xyj", P_seg, masks)
    return A1, A2, P_seg, P_test, P_test.argmax(-1)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    k, m, n, c, d1, d2, H, W = 7, 300, 25, 5, 16, 12, 9, 11
    S_test = _unit(rng.normal(size=(k, d1)))
    S_ref = _unit(rng.normal(size=(m, d1)))
    O = (rng.random((m, n)) < 0.08).astype(np.float64)
    O[np.arange(m), rng.integers(0, n, m)] = 1  # every segment has a label
    L_ref, L_test = _unit(rng.normal(size=(n, d2))), _unit(rng.normal(size=(c, d2)))
    seg = rng.integers(0, k, size=(H, W))
    seg[0, :k] = np.arange(k)
    return dict(S_test=S_test, S_ref=S_ref, O=O, L_ref=L_ref, L_test=L_test, seg=seg.astype(np.int32))


def _pairs(O):
    ps, pl = np.nonzero(O)
    return ps, pl


@pytest.mark.parametrize("t1,t2", [(1.0, 1.0), (30.0, 50.0)])
@pytest.mark.parametrize("chunk", [7, 65536])
def test_streamed_eqs_match_paper_transcription(data, t1, t2, chunk):
    masks = masks_from_segment_ids(data["seg"]).astype(np.float64)
    A1, A2, P_seg, P_test, label = paper_alg_a1(data["S_test"], data["S_ref"], data["O"], data["L_ref"],
                                                data["L_test"], masks, t1, t2)
    ps, pl = _pairs(data["O"])
    A2_r = label_affinity(data["L_ref"], data["L_test"], t2)
    np.testing.assert_allclose(A2_r.numpy(), A2, atol=1e-5)
    A1_r = segment_label_affinity(data["S_test"], data["S_ref"], ps, pl, data["O"].shape[1], logit_scale=t1)
    np.testing.assert_allclose(A1_r.numpy(), A1, atol=1e-5)
    B = reference_class_scores(ps, pl, A2_r, data["S_ref"].shape[0])
    P = segment_class_scores(data["S_test"], data["S_ref"], B, logit_scale=t1, chunk_size=chunk)
    np.testing.assert_allclose(P.numpy(), P_seg, atol=1e-5)
    Pt = pixel_class_scores(P, data["seg"])
    np.testing.assert_allclose(Pt.numpy(), P_test, atol=1e-5)
    np.testing.assert_allclose(pixel_class_scores_masks(P, masks.astype(bool)).numpy(), P_test, atol=1e-5)
    assert (Pt.argmax(-1).numpy() == label).all()


def test_top_k_restricts_softmax_and_equals_exact_at_n(data):
    ps, pl = _pairs(data["O"])
    A2 = label_affinity(data["L_ref"], data["L_test"], 10.0)
    B = reference_class_scores(ps, pl, A2, data["S_ref"].shape[0])
    m = data["S_ref"].shape[0]
    exact = segment_class_scores(data["S_test"], data["S_ref"], B, logit_scale=20.0)
    full = segment_class_scores(data["S_test"], data["S_ref"], B, logit_scale=20.0, top_k=m, chunk_size=64)
    np.testing.assert_allclose(full.numpy(), exact.numpy(), atol=1e-5)
    # top-k = 5 equals the softmax over the 5 nearest reference segments, computed directly
    sims = data["S_test"] @ data["S_ref"].T
    nn = np.argsort(-sims, axis=1)[:, :5]
    w = _softmax(20.0 * np.take_along_axis(sims, nn, 1), axis=1)
    expect = np.einsum("kt,ktc->kc", w, B.numpy()[nn])
    got = segment_class_scores(data["S_test"], data["S_ref"], B, logit_scale=20.0, top_k=5, chunk_size=50)
    np.testing.assert_allclose(got.numpy(), expect, atol=1e-5)
    A1 = segment_label_affinity(data["S_test"], data["S_ref"], ps, pl, data["O"].shape[1], logit_scale=20.0, top_k=5)
    np.testing.assert_allclose((A1 @ A2).numpy(), expect, atol=1e-5)


def test_unscaled_softmax_is_nearly_flat(data):
    """Why a logit scale is needed: with tau=1 every A1 row is close to the label prior."""
    ps, pl = _pairs(data["O"])
    A1 = segment_label_affinity(data["S_test"], data["S_ref"], ps, pl, data["O"].shape[1]).numpy()
    prior = data["O"].sum(0) / data["O"].shape[0]
    assert np.abs(A1 - prior).max() < 0.05
    A1s = segment_label_affinity(data["S_test"], data["S_ref"], ps, pl, data["O"].shape[1], logit_scale=100.0).numpy()
    assert np.abs(A1s - prior).max() > 0.2


def test_dimension_mismatch_raises(data):
    B = torch.zeros(data["S_ref"].shape[0], 3)
    with pytest.raises(ValueError, match="same d"):
        segment_class_scores(data["S_test"][:, :5], data["S_ref"], B)
    with pytest.raises(ValueError, match="rows"):
        segment_class_scores(data["S_test"], data["S_ref"], B[:5])
    with pytest.raises(ValueError, match="same d"):
        label_affinity(data["L_ref"], data["L_test"][:, :3])
    with pytest.raises(ValueError, match="top_k"):
        segment_class_scores(data["S_test"], data["S_ref"], B, top_k=0)
