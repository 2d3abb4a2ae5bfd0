"""Synonym enrichment (docs/method.md step 9): compound roots are not synonyms of their head (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

import reme.build.synonyms as synonyms
from reme.build.synonyms import head_of, synonym_pairs
from reme.encoders.text import embed_labels

ROOTS = ["dog", "hot dog", "bear", "teddy bear", "light", "traffic light", "cat", "kitten", "car", "automobile",
         "sofa", "couch", "tree", "sky", "road", "street", "lamp", "puppy", "person", "man", "table", "chair"]
HEAD_PAIRS = {frozenset(p) for p in (("dog", "hot dog"), ("bear", "teddy bear"), ("light", "traffic light"))}


def test_head_pairs_are_not_synonyms_with_minilm(minilm):
    E = embed_labels(minilm, ROOTS)
    plain = synonym_pairs(ROOTS, E, k_sim=10, skip_head_pairs=False)
    assert HEAD_PAIRS <= {frozenset(p[:2]) for p in plain}        # MiniLM ranks them among the top 10
    pairs = synonym_pairs(ROOTS, E, k_sim=10)
    got = {frozenset(p[:2]) for p in pairs}
    assert len(pairs) == 10 and not got & HEAD_PAIRS
    assert {frozenset(("car", "automobile")), frozenset(("sofa", "couch")), frozenset(("cat", "kitten"))} <= got
    assert [p[2] for p in pairs] == sorted((p[2] for p in pairs), reverse=True)
    assert head_of("traffic light") == "light" and head_of("dog") == "dog"


@pytest.mark.parametrize("skip", [False, True])
def test_blockwise_top_pairs_equal_the_full_matrix(monkeypatch, skip):
    rng = np.random.default_rng(0)
    roots = [f"r{i}" for i in range(57)] + ["x r3", "y r3", "z r10"]
    E = rng.normal(size=(len(roots), 8)).astype(np.float32)
    E[57:] = E[[3, 3, 10]] + 0.01 * rng.normal(size=(3, 8))          # compounds near their heads
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    sim = E @ E.T
    iu, ju = np.triu_indices(len(roots), 1)
    ok = np.array([not skip or (head_of(roots[j]) != roots[i] and head_of(roots[i]) != roots[j])
                   for i, j in zip(iu, ju)])
    order = np.lexsort((ju[ok], iu[ok], -sim[iu[ok], ju[ok]]))[:40]
    want = [(roots[iu[ok][t]], roots[ju[ok][t]]) for t in order]
    monkeypatch.setattr(synonyms, "_BLOCK_VALUES", 7 * len(roots))     # 7 rows per block
    got = synonym_pairs(roots, E, k_sim=40, skip_head_pairs=skip)
    assert [p[:2] for p in got] == want
    assert (("r3", "x r3") in [p[:2] for p in got]) is not skip
