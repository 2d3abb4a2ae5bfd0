"""k-means of the IVF index (faiss.Kmeans) and of the clustering proposals (k-means++ seeds +
faiss Lloyd iterations): behaviour on planted clusters, and the IVF lists they produce."""

from __future__ import annotations

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from faiss.contrib.inspect_tools import get_invlist  # noqa: E402

from reme.proposals.cluster import kmeans  # noqa: E402
from reme.reference.index import build_index, search, train_centroids  # noqa: E402


def _planted(n_per=100, k=4, d=16, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    truth = np.repeat(np.arange(k), n_per)
    X = (centres[truth] + noise * rng.normal(size=(len(truth), d))).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True), truth, centres


def test_train_centroids_recovers_planted_directions():
    X, truth, centres = _planted()
    C = train_centroids(X, 4, niter=20, seed=1)
    assert C.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(C, axis=1), 1.0, atol=1e-5)      # spherical: unit centroids
    # every planted direction has a centroid within a few degrees
    unit = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    assert (unit @ C.T).max(1).min() > 0.99
    with pytest.raises(ValueError):
        train_centroids(X[:0], 4)


def test_proposal_kmeans_matches_truth_up_to_relabelling_and_is_seeded():
    X, truth, _ = _planted(n_per=50, k=5, seed=3)
    a = kmeans(torch.from_numpy(X), 5, seed=2).numpy()
    assert len(set(zip(a.tolist(), truth.tolist()))) == 5 and len(set(a.tolist())) == 5
    np.testing.assert_array_equal(a, kmeans(torch.from_numpy(X), 5, seed=2).numpy())
    assert len(set(kmeans(torch.from_numpy(X[:3]), 8).tolist())) <= 3             # k clipped to n


def test_ivf_lists_hold_every_row_once_and_search_finds_itself():
    X, truth, _ = _planted(n_per=60, k=4)
    index = build_index(X, "ivf_flat", nlist=4, nprobe=4, niter=20)
    assert index.ntotal == len(X)
    ivf = faiss.extract_index_ivf(index)
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
    assert sizes.sum() == len(X)
    # every row sits in the list of its nearest centroid (inner product)
    C = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    want = (X @ C.T).argmax(1)
    for i in range(ivf.nlist):
        ids, _ = get_invlist(ivf.invlists, i)
        np.testing.assert_array_equal(np.sort(ids), np.flatnonzero(want == i))
    D, I = search(index, X[::7], 1)
    np.testing.assert_array_equal(I[:, 0], np.arange(0, len(X), 7))
