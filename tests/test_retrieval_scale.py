"""Retrieval at scale (issue 5): streamed exact eq. 1, FAISS top-k with exact re-scoring,
memory-mapped S_ref, sparse eq. 3 -- each checked against a literal float64 transcription."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from reme.errors import ReferenceSetError
from reme.reference.index import (
    FLAT_MAX_SEGMENTS,
    build_index,
    choose_index_kind,
    default_nlist,
    describe_index,
    read_index,
    search,
    write_index,
)
from reme.reference import ReferenceSet, load_reference, read_manifest
from reme.inference.retrieval import (
    exact_topk,
    label_affinity,
    o_ref_csr,
    pixel_class_scores,
    pixel_class_scores_masks,
    reference_class_scores,
    rescore,
    segment_class_scores,
    streamed_label_affinity,
    topk_label_affinity,
)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    """Clustered S_ref (so nearest neighbours are meaningful), multi-label O_ref."""
    rng = np.random.default_rng(0)
    k, m, n, d = 9, 1500, 40, 32
    centres = _unit(rng.normal(size=(30, d)))
    cl = rng.integers(0, 30, m)
    S_ref = _unit(centres[cl] + 0.6 / np.sqrt(d) * rng.normal(size=(m, d))).astype(np.float32)
    S_test = _unit(centres[rng.integers(0, 30, k)] + 0.6 / np.sqrt(d) * rng.normal(size=(k, d))).astype(np.float32)
    O = np.zeros((m, n))
    O[np.arange(m), rng.integers(0, n, m)] = 1
    O[rng.integers(0, m, 300), rng.integers(0, n, 300)] = 1
    L_ref, L_test = _unit(rng.normal(size=(n, 16))), _unit(rng.normal(size=(5, 16)))
    ps, pl = np.nonzero(O)
    return dict(S_test=S_test, S_ref=S_ref, O=O, ps=ps, pl=pl, L_ref=L_ref, L_test=L_test,
                csr=o_ref_csr(ps, pl, m, n))


def literal_A1(S_test, S_ref, O, tau, support=None):
    """softmax(tau S_test S_ref^T) O_ref in float64, optionally over the given (k, t) rows only."""
    logits = tau * S_test.astype(np.float64) @ S_ref.astype(np.float64).T
    if support is not None:
        mask = np.full_like(logits, -np.inf)
        np.put_along_axis(mask, support, 0.0, axis=1)
        logits = logits + mask
    return _softmax(logits) @ O


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("tau", [1.0, 50.0, 400.0])
@pytest.mark.parametrize("chunk", [1, 97, 100_000])
def test_streamed_A1_matches_literal(data, dtype, tau, chunk):
    S_ref = data["S_ref"].astype(dtype)
    A1 = streamed_label_affinity(data["S_test"], S_ref, data["csr"], logit_scale=tau, chunk_size=chunk)
    np.testing.assert_allclose(A1.numpy(), literal_A1(data["S_test"], S_ref, data["O"], tau), atol=1e-5)


def test_streamed_from_memory_map_and_shift_raise(tmp_path, data):
    """A float16 memory map is read in place; a first block far below the best match (the
    online shift must be raised later) still gives the exact softmax at a large scale."""
    S = data["S_ref"].copy()
    order = np.argsort(-(S @ data["S_test"][0]))[::-1]                        # least similar first
    S = S[order]
    O = data["O"][order]
    np.save(tmp_path / "S.npy", S.astype(np.float16))
    S_mm = np.load(tmp_path / "S.npy", mmap_mode="r")
    ps, pl = np.nonzero(O)
    csr = o_ref_csr(ps, pl, *O.shape)
    for tau in (100.0, 200.0):                                               # float32 logits: ~1e-5 at 300
        A1 = streamed_label_affinity(data["S_test"], S_mm, csr, logit_scale=tau, chunk_size=50)
        assert torch.isfinite(A1).all()
        np.testing.assert_allclose(A1.numpy(), literal_A1(data["S_test"], S_mm, O, tau), atol=1e-5)


def test_dense_B_path_and_P_seg(data):
    A2 = label_affinity(data["L_ref"], data["L_test"], 20.0)
    B = reference_class_scores(data["ps"], data["pl"], A2, data["S_ref"].shape[0])
    P = segment_class_scores(data["S_test"], data["S_ref"].astype(np.float16), B, logit_scale=30.0, chunk_size=64)
    A1 = streamed_label_affinity(data["S_test"], data["S_ref"].astype(np.float16), data["csr"], logit_scale=30.0)
    expect = literal_A1(data["S_test"], data["S_ref"].astype(np.float16), data["O"], 30.0) @ A2.numpy()
    np.testing.assert_allclose(P.numpy(), expect, atol=1e-5)
    np.testing.assert_allclose((A1 @ A2).numpy(), expect, atol=1e-5)


def test_exact_topk_and_topk_with_k_equal_m_is_exact(data):
    m = data["S_ref"].shape[0]
    sims, ids = exact_topk(data["S_test"], data["S_ref"].astype(np.float16), 7, chunk_size=100)
    S16 = data["S_ref"].astype(np.float16).astype(np.float64)
    full = data["S_test"].astype(np.float64) @ S16.T
    np.testing.assert_array_equal(ids.numpy(), np.argsort(-full, axis=1)[:, :7])
    np.testing.assert_allclose(sims.numpy(), np.sort(full, axis=1)[:, ::-1][:, :7], atol=1e-5)
    sims, ids = exact_topk(data["S_test"], data["S_ref"], m, chunk_size=333)
    A1 = topk_label_affinity(sims, ids, data["csr"], logit_scale=50.0).to_dense()
    np.testing.assert_allclose(A1.numpy(), literal_A1(data["S_test"], data["S_ref"], data["O"], 50.0), atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_sq8"])
def test_faiss_topk_with_k_equal_m_is_exact(data, kind):
    m = data["S_ref"].shape[0]
    S16 = data["S_ref"].astype(np.float16)
    index = build_index(S16, kind, nlist=8, nprobe=8)
    assert describe_index(index)["kind"] == kind and index.ntotal == m
    _, ids = search(index, data["S_test"], m)
    assert (np.sort(ids, axis=1) == np.arange(m)).all()                       # every row once
    sims = rescore(data["S_test"], S16, ids)
    A1 = topk_label_affinity(sims, ids, data["csr"], logit_scale=50.0).to_dense()
    np.testing.assert_allclose(A1.numpy(), literal_A1(data["S_test"], S16, data["O"], 50.0), atol=1e-5)


def test_ivf_topk_restricts_softmax_to_rescored_candidates(data, tmp_path):
    S16 = data["S_ref"].astype(np.float16)
    index = build_index(S16, "ivf_sq8", nlist=16, nprobe=4)
    write_index(index, tmp_path / "i.faiss")
    index = read_index(tmp_path / "i.faiss")
    assert describe_index(index)["nprobe"] == 4
    D, ids = search(index, data["S_test"], 20)
    true_sims, true_ids = exact_topk(data["S_test"], S16, 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ids, true_ids.numpy())])
    assert recall > 0.8                                                       # clustered data
    sims = rescore(data["S_test"], S16, ids)
    exact = (data["S_test"].astype(np.float64) @ S16.astype(np.float64).T)
    np.testing.assert_allclose(sims.numpy(), np.take_along_axis(exact, ids, 1), atol=1e-5)
    assert np.abs(D - sims.numpy()).max() > 1e-6                              # SQ8 distances are estimates
    A1 = topk_label_affinity(sims, ids, data["csr"], logit_scale=50.0).to_dense()
    np.testing.assert_allclose(A1.numpy(), literal_A1(data["S_test"], S16, data["O"], 50.0, support=ids), atol=1e-5)


def test_missing_candidates_are_ignored(data):
    ids = np.array([[3, -1, 5], [-1, -1, -1]])
    sims = rescore(data["S_test"][:2], data["S_ref"], ids)
    assert torch.isinf(sims[0, 1]) and torch.isinf(sims[1]).all()
    A1 = topk_label_affinity(sims, ids, data["csr"], logit_scale=10.0).to_dense().numpy()
    np.testing.assert_allclose(A1[0], literal_A1(data["S_test"][:1], data["S_ref"], data["O"], 10.0,
                                                 support=np.array([[3, 5]]))[0], atol=1e-6)
    assert (A1[1] == 0).all()


def test_index_kind_by_size():
    assert choose_index_kind(1000) == "flat" and choose_index_kind(FLAT_MAX_SEGMENTS - 1) == "flat"
    assert choose_index_kind(FLAT_MAX_SEGMENTS) == "ivf_sq8" and choose_index_kind(3_000_000) == "ivf_sq8"
    assert choose_index_kind(20_000_000) == "ivf_pq"
    assert default_nlist(1_000_000) == 2048
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(np.zeros((4, 8), np.float32), "hnsw9")


def test_eq3_gather_and_sparse_masks_match_literal():
    rng = np.random.default_rng(1)
    k, H, W, c = 6, 13, 17, 4
    P = torch.rand(k, c)
    masks = rng.random((k, H, W)) < 0.3                                       # overlapping
    expect = np.einsum("ixy,ij->xyj", masks.astype(np.float64), P.numpy().astype(np.float64))
    lists = ([np.flatnonzero(mk) for mk in masks], (H, W))
    sparse = torch.tensor(masks).to_sparse()
    for form in (masks, torch.tensor(masks), lists, sparse):
        np.testing.assert_allclose(pixel_class_scores_masks(P, form).numpy(), expect, atol=1e-6)
    seg = rng.integers(0, k, (H, W))
    np.testing.assert_allclose(pixel_class_scores(P, seg).numpy(),
                               pixel_class_scores_masks(P, seg[None] == np.arange(k)[:, None, None]).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="masks"):
        pixel_class_scores_masks(P[:3], masks)


def test_sparse_masks_scale_with_pixels_not_k_times_hw():
    """5000 small masks on a 2000 x 2000 image: dense float masks would need 80 GB."""
    k, H, W = 5000, 2000, 2000
    lists = [np.arange(i * 50, i * 50 + 60) for i in range(k)]                # mask i overlaps mask i+1 by 10
    P = torch.rand(k, 3)
    out = pixel_class_scores_masks(P, (lists, (H, W)))
    assert out.shape == (H, W, 3)
    flat = out.reshape(H * W, 3)
    np.testing.assert_allclose(flat[7 * 50 + 15].numpy(), P[7].numpy(), rtol=1e-6)           # one mask
    np.testing.assert_allclose(flat[7 * 50 + 55].numpy(), (P[7] + P[8]).numpy(), rtol=1e-6)  # overlap
    assert float(flat[k * 50 + 100:].abs().max()) == 0.0                                     # no mask


def _ref(m=300, d=26, n=6, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    S = _unit(rng.normal(size=(m, d))).astype(dtype)
    L = _unit(rng.normal(size=(n, 384))).astype(np.float32)
    return ReferenceSet(S_ref=S, L_ref=L, pair_segment=np.arange(m), pair_label=rng.integers(0, n, m),
                        labels=[f"label {j}" for j in range(n)], roots=[f"root{j}" for j in range(n)],
                        segment_image=[f"img{i % 3}.jpg" for i in range(m)],
                        segment_bbox=rng.integers(0, 50, (m, 4)), segment_area=rng.integers(1, 500, m),
                        manifest={"encoders": {"visual": "classical", "text": "minilm"}, "mode": "test"},
                        segment_source=["gt_mask"] * m)


def test_saved_S_ref_is_a_checked_memory_map(tmp_path):
    ref = _ref()
    ref.save(tmp_path / "ref")
    man = read_manifest(tmp_path / "ref")
    assert man["format_version"] == 2 and man["s_ref_file"] == "S_ref.npy" and "S_ref.npy" in man["files"]
    assert man["index"]["kind"] == "flat" and man["index"]["ntotal"] == 300
    assert "embedding" not in pq.read_schema(tmp_path / "ref" / "segments.parquet").names
    back = load_reference(tmp_path / "ref")
    assert isinstance(back.S_ref, np.memmap) and not back.S_ref.flags.writeable
    assert back.S_ref.dtype == np.float16 and back.segment_source == ["gt_mask"] * 300
    np.testing.assert_allclose(back.S_ref, ref.S_ref, atol=1e-3)
    assert back.load_index().ntotal == 300
    assert not isinstance(load_reference(tmp_path / "ref", mmap=False).S_ref, np.memmap)
    f = tmp_path / "ref" / "S_ref.npy"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ReferenceSetError, match="S_ref.npy does not match the sha256"):
        load_reference(tmp_path / "ref")
    with pytest.raises(ReferenceSetError, match="S_ref.npy.*truncated or corrupt"):
        load_reference(tmp_path / "ref", verify=False)


def test_format_1_folder_still_loads(tmp_path):
    """A folder of the previous layout (S_ref as a Parquet column) loads; unknown versions are refused."""
    ref = _ref(m=40)
    ref.save(tmp_path / "v1")
    folder = tmp_path / "v1"
    S = np.load(folder / "S_ref.npy")
    seg = pq.read_table(folder / "segments.parquet")
    seg = seg.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(S.ravel()), S.shape[1]))
    pq.write_table(seg, folder / "segments.parquet")
    (folder / "S_ref.npy").unlink()
    man = json.loads((folder / "manifest.json").read_text())
    man["format_version"] = 1
    for key in ("s_ref_file", "index"):
        man.pop(key)
    from reme.io import sha256_file

    man["files"] = {f.name: sha256_file(f) for f in folder.iterdir() if f.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps(man))
    back = load_reference(folder)
    np.testing.assert_array_equal(back.S_ref, S)
    man["format_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ReferenceSetError, match="format_version 99, this reme reads 1, 2"):
        load_reference(folder)


def test_segmenter_topk_equals_exact_search_and_keeps_the_memory_map(tmp_path, classical, minilm):
    from reme.inference.segmenter import Segmenter

    rng = np.random.default_rng(0)
    ref = _ref(m=400, d=classical.dim)
    ref.save(tmp_path / "ref")
    loaded = load_reference(tmp_path / "ref")
    img = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
    exact = Segmenter(loaded, visual_encoder=classical, text_encoder=minilm, device="cpu", top_k=10)
    assert exact.predictor.S_ref is loaded.S_ref                                       # no float32 copy
    topk = Segmenter(loaded, visual_encoder=classical, text_encoder=minilm, device="cpu", top_k=10, retrieval="topk")
    _, P_exact, _ = exact.segment_scores(img, "a, b, c")[:3]
    _, P_topk, _ = topk.segment_scores(img, "a, b, c")[:3]
    np.testing.assert_allclose(P_topk.numpy(), P_exact.numpy(), atol=1e-5)    # flat index = exact search
    full = Segmenter(loaded, visual_encoder=classical, text_encoder=minilm, device="cpu", top_k=None)
    seg, P_full, _ = full.segment_scores(img, "a, b, c")[:3]
    assert P_full.shape == (int(seg.max()) + 1, 3) and torch.isfinite(P_full).all()
    with pytest.raises(ValueError, match="retrieval"):
        Segmenter(loaded, visual_encoder=classical, text_encoder=minilm, device="cpu", retrieval="ann")
