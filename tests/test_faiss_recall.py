"""FAISS top-k defaults keep recall@10 >= 0.95 (issue 13). The real-embedding measurement is in
docs/performance.md (scripts/bench_faiss_recall.py); this is a fast synthetic check of the same
quantity on overlapping clusters, where the earlier default (nprobe 4) fell short."""

import numpy as np
import torch

from reme.reference.index import DEFAULT_NPROBE, build_index, describe_index, search
from reme.inference.retrieval import DEFAULT_TOPK_CANDIDATES, exact_topk


def _overlapping_clusters(n=20000, d=32, topics=64, noise=1.1, queries=200, seed=0):
    """Unit rows around random topic centres (cosine to the centre ~0.67), and queries that
    are perturbed rows (cosine ~0.96 to their source)."""
    g = np.random.default_rng(seed)
    C = g.standard_normal((topics, d)).astype(np.float32)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    X = C[g.integers(0, topics, n)] + noise / np.sqrt(d) * g.standard_normal((n, d)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q = X[g.choice(n, queries, replace=False)] + 0.3 / np.sqrt(d) * g.standard_normal((queries, d)).astype(np.float32)
    return X, Q / np.linalg.norm(Q, axis=1, keepdims=True)


def _recall_at_10(index, X, Q, nprobe, candidates):
    _, truth = exact_topk(torch.from_numpy(Q), X, 10)
    _, found = search(index, Q, candidates, nprobe=nprobe)
    return float(np.mean([len(set(t.tolist()) & set(f.tolist())) / 10 for t, f in zip(truth.numpy(), found)]))


def test_default_nprobe_and_candidates_keep_recall_at_10():
    X, Q = _overlapping_clusters()
    index = build_index(X, "ivf_sq8")                              # the kind used from 200k rows on
    assert describe_index(index)["nprobe"] == DEFAULT_NPROBE       # stored in new indexes
    at_default = _recall_at_10(index, X, Q, DEFAULT_NPROBE, DEFAULT_TOPK_CANDIDATES)
    assert at_default >= 0.95
    assert _recall_at_10(index, X, Q, 4, DEFAULT_TOPK_CANDIDATES) < 0.95    # the old nprobe does not
    assert DEFAULT_TOPK_CANDIDATES >= 10                           # recall@10 needs 10 candidates at least
