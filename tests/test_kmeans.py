"""One spherical k-means for the IVF index and the clustering proposals (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reme.reference.index as index_mod
from reme.reference.index import spherical_kmeans
from reme.proposals.cluster import kmeans


@pytest.mark.parametrize("init", ["random", "k-means++"])
def test_spherical_kmeans_recovers_planted_directions(init):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    truth = rng.integers(0, 4, 400)
    X = torch.tensor(centres[truth] + 0.05 * rng.normal(size=(400, 16)), dtype=torch.float32)
    C, assign = spherical_kmeans(X, 4, init=init, seed=1, block=37)
    a = assign.numpy()
    assert len(set(zip(a.tolist(), truth.tolist()))) == 4             # a one-to-one relabelling of the truth
    np.testing.assert_allclose(C.norm(dim=1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, (torch.nn.functional.normalize(X, dim=1) @ C.T).argmax(1).numpy())
    with pytest.raises(ValueError):
        spherical_kmeans(X, 4, init="kmeans")


def test_proposals_and_index_share_the_implementation(monkeypatch):
    calls = []
    real = index_mod.spherical_kmeans

    def spy(*a, **k):
        calls.append(k.get("init", "random"))
        return real(*a, **k)

    monkeypatch.setattr(index_mod, "spherical_kmeans", spy)
    import reme.proposals.cluster as pc

    monkeypatch.setattr(pc, "spherical_kmeans", spy)
    X = torch.randn(300, 8)
    kmeans(X, 3)
    pytest.importorskip("faiss")
    index_mod.build_index(np.asarray(torch.nn.functional.normalize(X, dim=1)), "ivf_flat", nlist=4)
    assert calls == ["k-means++", "random"]
