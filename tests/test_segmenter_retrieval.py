"""Segmenter-level checks of issue 13: A2 computed once per class list, the literal eq. 1
through both branches of the full softmax, and the paper-form warning on the FAISS path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reme.inference.predictor as predictor_mod
from conftest import REPO, photo
from reme.eval.ablation import reference_from_pairs
from reme.reference import load_reference
from reme.inference.predictor import A2_CACHE_SIZE, Predictor
from reme.inference.segmenter import Segmenter

REF = REPO / "reference_sets" / "default"


@pytest.fixture(scope="module")
def image():
    return photo("coffee")[::3, ::3].copy()


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_a2_is_computed_once_per_class_list(monkeypatch):
    image = photo("coffee")[::8, ::8].copy()
    calls = []
    real = predictor_mod.label_affinity
    monkeypatch.setattr(predictor_mod, "label_affinity", lambda *a, **k: calls.append(1) or real(*a, **k))
    seg = Segmenter(REF, device="cpu")
    classes = ["cup", "table", "person"]
    first = seg.predict(image, classes)
    second = seg.predict(image, classes)
    assert len(calls) == 1                                        # the second image reuses A2
    np.testing.assert_array_equal(first.label_map, second.label_map)
    np.testing.assert_array_equal(first.segment_scores, second.segment_scores)
    pred = seg.predictor
    syn = [[c] for c in classes]
    L_test, _ = pred.class_embeddings(syn)
    assert torch.equal(pred.class_affinity(syn)[0], real(pred.L_ref, L_test, pred.label_logit_scale))  # same A2
    assert len(calls) == 1
    pred.class_affinity([["cup"], ["table"]])
    assert len(calls) == 2                                        # another list: a new A2
    assert A2_CACHE_SIZE >= 2
    monkeypatch.setattr(predictor_mod, "A2_CACHE_SIZE", 2)
    other = Predictor(pred.reference, visual_encoder=pred.visual_encoder, text_encoder=pred.text_encoder,
                      label_logit_scale=10.0, device="cpu")
    other.class_affinity(syn)
    assert len(calls) == 3                                        # tau2 is part of the key (another predictor)
    other.class_affinity([["cup"], ["table"]])                    # 4 calls, 2 entries kept
    other.class_affinity(syn)                                     # a hit, now the most recent
    other.class_affinity([["cup"], ["sky"]])                      # new: evicts the least recent (cup, table)
    assert len(other.a2_cache) == 2 and len(calls) == 5
    other.class_affinity(syn)
    assert len(calls) == 5                                        # LRU kept the recently used list
    other.class_affinity([["cup"], ["table"]])
    assert len(calls) == 6                                        # the evicted one is computed again


@pytest.mark.parametrize("classes,branch", [(["cup"], "B"), ([f"c{i}" for i in range(40)], "A1")])
def test_full_softmax_equals_literal_eq1_in_both_branches(image, monkeypatch, classes, branch):
    """Paper form of eq. 1 (no top-k) at Segmenter level: A1 = softmax(tau1 S_test S_ref^T) O_ref,
    P_seg = A1 softmax(tau2 L_ref L_test^T), in float64, against the streamed A1 (k n <= m c)
    and the B = O_ref A2 branch."""
    used = []
    for name in ("a1_reducer", "reference_class_scores"):
        real = getattr(predictor_mod, name)
        monkeypatch.setattr(predictor_mod, name, lambda *a, _r=real, _n=name, **k: used.append(_n) or _r(*a, **k))
    full = load_reference(REF)
    sub = full.pair_segment < 1000                                 # m = 1000, n = 56: k n vs m c picks the branch
    small = reference_from_pairs(full, full.pair_segment[sub], full.pair_label[sub])
    seg = Segmenter(small, device="cpu", top_k=None, segment_logit_scale=20.0, label_logit_scale=30.0, chunk_size=300)
    _, P, _, S_test = seg.segment_scores(image, classes, return_embeddings=True)
    ref = seg.reference
    O = np.zeros((ref.num_segments, ref.num_labels))
    O[ref.pair_segment, ref.pair_label] = 1.0
    L_test, _ = seg.predictor.class_embeddings([[c] for c in classes])
    A1 = _softmax(20.0 * S_test.double().numpy() @ np.asarray(ref.S_ref, np.float64).T) @ O
    A2 = _softmax(30.0 * np.asarray(ref.L_ref, np.float64) @ L_test.double().numpy().T)
    np.testing.assert_allclose(P.numpy(), A1 @ A2, rtol=1e-4, atol=1e-7)
    assert used == (["a1_reducer"] if branch == "A1" else ["reference_class_scores"])


def test_paper_form_on_faiss_path_warns():
    with pytest.warns(UserWarning, match="full softmax"):
        Segmenter(REF, device="cpu", retrieval="topk", top_k=None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Segmenter(REF, device="cpu", retrieval="topk", top_k=10)
        Segmenter(REF, device="cpu", retrieval="exact", top_k=None)
