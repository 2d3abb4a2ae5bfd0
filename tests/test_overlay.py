"""Overlay reference sets (issue 15): segments added by example are searched with the base,
merged retrieval equals the exact path over the concatenated set, undo restores the base, an
overlay made with other encoders is refused, and saves are atomic under concurrent sessions."""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import reme.inference.editor as editor_mod
from conftest import REPO, photo, writers_with_reader
from reme.errors import ReferenceSetError
from reme.eval.ablation import reference_from_pairs
from reme.reference.overlay import EXAMPLES_FILE, Overlay, StackedRows, load_overlay
from reme.reference import concat_references, load_reference
from reme.inference.segmenter import Segmenter

REF = REPO / "reference_sets" / "default"
CLASSES = ["cup", "table", "saucer", "spoon"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """2,000 segments of the embedded default, saved with a flat FAISS index."""
    full = load_reference(REF)
    sub = full.pair_segment < 2000
    small = reference_from_pairs(full, full.pair_segment[sub], full.pair_label[sub])
    path = tmp_path_factory.mktemp("base") / "ref"
    small.save(path, with_index=True)
    return load_reference(path)


@pytest.fixture(scope="module")
def image():
    return photo("coffee")[::3, ::3].copy()


@pytest.fixture(scope="module")
def seg(base):
    return Segmenter(base, device="cpu")


def _taught(seg, image):
    """A copy of ``seg`` with two examples: a new label ("saucer") and a base one."""
    s = seg.with_overlay()
    r = s.predict(image, CLASSES)
    ids = np.unique(r.segment_ids[r.segment_ids.shape[0] // 2:, :r.segment_ids.shape[1] // 3])[:5]
    s.add_examples(image, ids.tolist(), "saucer")
    mask = np.zeros(image.shape[:2], bool)
    mask[: image.shape[0] // 4] = True
    s.add_examples(image, mask, seg.reference.labels[0])
    return s


def test_stacked_rows_reads_like_the_concatenation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)).astype(np.float16), rng.normal(size=(4, 3)).astype(np.float16)
    st, cat = StackedRows([a, b]), np.concatenate([a, b])
    assert st.shape == cat.shape and st.dtype == cat.dtype
    for sl in (slice(0, 5), slice(5, 9), slice(7, 11), slice(3, 100), slice(0, 0)):
        np.testing.assert_array_equal(st[sl], cat[sl])
    ids = np.array([10, 0, 7, 6, 3])
    np.testing.assert_array_equal(st[ids], cat[ids])
    with pytest.raises(IndexError):
        st[np.array([11])]


@pytest.mark.parametrize("retrieval,top_k", [("topk", 10), ("exact", 10), ("exact", None)])
def test_merged_retrieval_equals_exact_over_the_concatenation(seg, image, retrieval, top_k):
    taught = _taught(seg, image)
    ov = taught.overlay
    assert ov.num_rows > 0 and "saucer" in ov.label_embeddings
    merged = Segmenter(seg.reference, device="cpu", retrieval=retrieval, top_k=top_k, overlay=ov)
    concat = Segmenter(concat_references([seg.reference, ov.to_reference()]), device="cpu", retrieval="exact",
                       top_k=top_k)
    assert concat.reference.labels == merged.merged_reference().labels          # same label order
    _, P_m, _ = merged.segment_scores(image, CLASSES)
    _, P_c, _ = concat.segment_scores(image, CLASSES)
    np.testing.assert_allclose(P_m.numpy(), P_c.numpy(), rtol=1e-5, atol=1e-6)
    _, P_b, _ = Segmenter(seg.reference, device="cpu", retrieval=retrieval, top_k=top_k).segment_scores(image, CLASSES)
    assert not np.allclose(P_m.numpy(), P_b.numpy())                             # the examples changed it


def test_examples_take_effect_and_undo_restores_the_base_exactly(seg, image):
    s = seg.with_overlay()
    before = s.predict(image, CLASSES)
    saucer = CLASSES.index("saucer")
    areas = np.bincount(before.segment_ids.ravel()).astype(float)
    areas[before.segment_scores.argmax(1) == saucer] = -1
    target = int(areas.argmax())                                  # the largest segment not yet "saucer"
    assert areas[target] > 0
    eid = s.add_examples(image, [target], "saucer")
    after = s.predict(image, CLASSES)
    assert after.segment_scores[target].argmax() == saucer                        # the segment itself is now found
    assert s.examples()[0]["example_id"] == eid and s.examples()[0]["labels"] == ["saucer"]
    s.add_examples(image, (before.segment_ids == 0), "table")
    assert len(s.examples()) == 2
    assert s.remove_examples() > 0                                              # undo the last
    np.testing.assert_array_equal(s.predict(image, CLASSES).segment_scores, after.segment_scores)
    assert s.remove_examples(eid) == 1
    again = s.predict(image, CLASSES)
    np.testing.assert_array_equal(again.segment_scores, before.segment_scores)    # the base, exactly
    np.testing.assert_array_equal(again.label_map, before.label_map)
    assert s.overlay.num_rows == 0 and s.overlay.label_embeddings == {}
    with pytest.raises(KeyError):
        s.remove_examples("nope")


def test_a2_of_base_labels_is_unchanged_and_base_labels_reuse_their_rows(seg, image, monkeypatch):
    s = seg.with_overlay()
    syn = [[c] for c in CLASSES]
    A2_before = s._class_affinity(syn)[0].clone()
    calls = []
    real = editor_mod.embed_labels
    monkeypatch.setattr(editor_mod, "embed_labels", lambda enc, labels, *a, **k: calls.append(list(labels)) or real(enc, labels, *a, **k))
    existing = seg.reference.labels[3]
    s.add_examples(image, [0, 1], existing)
    assert calls == []                                                           # existing label: its L_ref row
    assert s._merged.new_labels == [] and s._merged.row_labels.tolist() == [3] * s.overlay.num_rows
    np.testing.assert_array_equal(s.overlay.label_embeddings[existing], seg.reference.L_ref[3])
    s.add_examples(image, [2], "  striped   rug ")
    assert calls == [["striped rug"]]                                             # new label: text encoder
    A2_after = s._class_affinity(syn)[0]
    n = seg.reference.num_labels
    assert A2_after.shape == (n + 1, len(CLASSES))
    assert torch.equal(A2_after[:n], A2_before)                                   # other labels: same A2 rows


def test_add_reuses_the_features_of_the_last_prediction(seg, image, monkeypatch):
    s = seg.with_overlay()
    s.predict(image, CLASSES)
    calls = []
    real = s.visual_encoder.dense_features
    monkeypatch.setattr(s.visual_encoder, "dense_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    s.add_examples(image, [0], "cup")
    assert calls == []
    s.add_examples(image[::2, ::2].copy(), [0], "cup")                           # another image: one pass
    assert calls == [1]


def test_bad_regions_are_refused(seg, image):
    s = seg.with_overlay()
    with pytest.raises(ValueError, match="mask is"):
        s.add_examples(image, np.ones((5, 5), bool), "cup")
    with pytest.raises(ValueError, match="segment ids"):
        s.add_examples(image, [10 ** 6], "cup")
    with pytest.raises(ValueError, match="label"):
        s.add_examples(image, [0], "  ")
    with pytest.raises(ValueError, match="names"):
        s.add_examples(image, np.zeros(image.shape[:2], np.int32), "cup")
    assert s.add_examples(image, np.zeros(image.shape[:2], bool), "cup") == ""    # empty mask: nothing added
    assert s.overlay.num_rows == 0


def test_label_map_adds_gt_mode_pieces(seg, image):
    s = seg.with_overlay()
    lm = np.full(image.shape[:2], -1, np.int32)
    lm[:, : image.shape[1] // 2] = 0
    lm[:, image.shape[1] // 2:] = 1
    s.add_examples(image, lm, ["cup", "table"])
    rec = s.examples()
    assert len(rec) == 1 and rec[0]["labels"] == ["cup", "table"]
    assert set(s.overlay.labels) == {"cup", "table"}
    boxes = {lab: tuple(s.overlay.mask_bbox[s.overlay.labels.index(lab)]) for lab in ("cup", "table")}
    H, W = image.shape[:2]
    assert boxes["cup"] == (0, 0, W // 2, H) and boxes["table"] == (W // 2, 0, W - W // 2, H)


def test_overlay_saves_loads_and_stays_beside_the_base(seg, image, tmp_path):
    s = _taught(seg, image)
    with pytest.raises(ValueError, match="inside the base"):
        s.save_overlay(seg.reference.path / "mine")
    out = s.save_overlay(tmp_path / "ov")
    man = json.loads((out / "manifest.json").read_text())
    assert "overlay" in man and man["encoders"] == seg.reference.manifest["encoders"]
    assert EXAMPLES_FILE in man["files"] and man["embedding_dtype"] == "float16"
    t = pq.read_table(out / EXAMPLES_FILE)
    assert t.num_rows == s.overlay.num_rows
    assert set(t.column_names) >= {"example_id", "image", "mask_bbox", "label", "added", "encoder"}
    assert set(t.column("encoder").to_pylist()) == {seg.reference.manifest["encoders"]["visual"]}
    back = Segmenter(seg.reference, device="cpu", overlay=out)
    assert back.overlay.labels == s.overlay.labels and back.examples() == s.examples()
    np.testing.assert_array_equal(back.predict(image, CLASSES).segment_scores, s.predict(image, CLASSES).segment_scores)
    # deleting the overlay folder gives back the base
    import shutil

    shutil.rmtree(out)
    fresh = Segmenter(seg.reference, device="cpu", overlay=out)
    np.testing.assert_array_equal(fresh.predict(image, CLASSES).segment_scores, seg.predict(image, CLASSES).segment_scores)
    with pytest.raises(ValueError, match="not an overlay"):
        Overlay.empty(seg.reference).save(seg.reference.path, base_path=tmp_path / "elsewhere")


def test_overlay_with_other_encoders_is_refused(seg, image, tmp_path):
    s = _taught(seg, image)
    out = s.save_overlay(tmp_path / "ov")
    man = json.loads((out / "manifest.json").read_text())
    man["encoders"]["visual"] = "classical"
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ReferenceSetError, match="visual encoder 'classical'"):
        Segmenter(seg.reference, device="cpu", overlay=out)
    ov = load_overlay(out)
    ov.encoders["visual"] = seg.reference.manifest["encoders"]["visual"]
    ov.encoders["text"] = "clip-vit-b-16"
    with pytest.raises(ReferenceSetError, match="text encoder"):
        seg.with_overlay(ov)


def test_truncated_overlay_file_is_reported(seg, image, tmp_path):
    out = _taught(seg, image).save_overlay(tmp_path / "ov")
    f = out / EXAMPLES_FILE
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(ReferenceSetError, match=EXAMPLES_FILE):
        load_overlay(out)


def test_concurrent_sessions_save_atomically(seg, image, tmp_path):
    """Sessions add and save in threads: each own overlay plus one shared folder (saved under a
    lock, as the demo does); a reader loading the shared folder meanwhile always gets a complete
    overlay, and every session's folder holds exactly its own examples."""
    s0 = seg.with_overlay()
    s0.predict(image, CLASSES)
    shared_path, lock = tmp_path / "shared", threading.Lock()
    shared = seg.with_overlay(shared_path)
    def session(i):
        mine = seg.with_overlay(tmp_path / f"s{i}")
        for j in range(3):
            mine.add_examples(image, [i * 3 + j], f"thing {i}", save=True)
            with lock:
                shared.add_examples(image, [i * 3 + j], f"thing {i}", save=True)

    errors, seen = writers_with_reader(session, 4, shared_path, lambda p: load_overlay(p).num_rows)
    assert errors == []
    for i in range(4):
        ov = load_overlay(tmp_path / f"s{i}")
        assert set(ov.labels) == {f"thing {i}"} and len(ov.examples()) == 3
    final = load_overlay(shared_path)
    assert len(final.examples()) == 12 and final.num_rows == shared.overlay.num_rows
    assert seen and all(0 < n <= final.num_rows for n in seen)
    assert not list(tmp_path.glob(".*.tmp"))                                      # no temp folders left


def test_example_bias_favours_the_overlay_and_needs_top_k(seg, image):
    s = seg.with_overlay()
    r = s.predict(image, CLASSES)
    s.add_examples(image, list(range(12)), "saucer")                             # >= top_k rows, one label
    assert s.overlay.num_rows >= s.top_k
    plain = s.predict(image, CLASSES)
    s.example_bias = 1.0                       # overlay similarities + 1 > any base similarity
    biased = s.predict(image, CLASSES)
    saucer = CLASSES.index("saucer")
    assert (biased.segment_scores.argmax(1) == saucer).all()                     # every candidate is an example
    assert (plain.segment_scores.argmax(1) != saucer).any()
    assert (r.segment_scores.argmax(1) != saucer).any()
    with pytest.raises(ValueError, match="top_k"):
        Segmenter(seg.reference, device="cpu", top_k=None, example_bias=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Segmenter(seg.reference, device="cpu", example_bias=-0.1)
