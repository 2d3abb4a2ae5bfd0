"""Retrieval evidence (the reference segments behind A1, eq. 1), ``segment --explain`` and the
contact sheet."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO, needs_shared, photo
from PIL import Image

from reme.report.contact_sheet import contact_sheet, largest_segments, segment_bbox
from reme.report.crops import ReferenceImages, image_roots_from_manifest
from reme.inference.evidence import label_class_affinity, retrieval_evidence
from reme.reference import ReferenceSet
from reme.inference.retrieval import segment_label_affinity

DEFAULT_REF = REPO / "reference_sets" / "default"


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def synthetic():
    rng = np.random.default_rng(3)
    k, m, n, d = 6, 240, 9, 12
    S_ref = _unit(rng.normal(size=(m, d)))
    ps = np.concatenate([np.arange(m), rng.integers(0, m, 40)])         # some segments carry 2 labels
    pl = rng.integers(0, n, ps.size)
    keep = np.unique(np.stack([ps, pl], 1), axis=0)
    ref = ReferenceSet(S_ref=S_ref, L_ref=_unit(rng.normal(size=(n, 5))), pair_segment=keep[:, 0],
                       pair_label=keep[:, 1], labels=[f"label{j}" for j in range(n)], roots=[f"r{j}" for j in range(n)],
                       segment_image=[f"img{i % 7}.png" for i in range(m)],
                       segment_bbox=np.tile([1, 2, 3, 4], (m, 1)), segment_area=np.full(m, 12))
    return ref, _unit(rng.normal(size=(k, d)))


@pytest.mark.parametrize("chunk", [17, 65536])
def test_neighbours_are_exact_top_k_and_votes_equal_A1(synthetic, chunk):
    ref, S_test = synthetic
    ev = retrieval_evidence(S_test, ref, top_k=10, logit_scale=50.0, chunk_size=chunk)
    sim = S_test @ ref.S_ref.T
    order = np.argsort(-sim, axis=1)[:, :10]
    np.testing.assert_array_equal(ev.reference_ids, order)
    np.testing.assert_allclose(ev.similarity, np.take_along_axis(sim, order, 1), atol=1e-6)
    np.testing.assert_allclose(ev.covered, 1.0, atol=1e-5)
    A1 = segment_label_affinity(S_test, ref.S_ref, ref.pair_segment, ref.pair_label, ref.num_labels,
                                logit_scale=50.0, top_k=10).numpy()
    for i in range(ev.num_segments):
        row = np.zeros(ref.num_labels)
        for lab, w in ev.label_votes(i):
            row[int(lab[5:])] = w
        np.testing.assert_allclose(row, A1[i], atol=1e-5)
    O = ref.O_ref_dense()
    for i, r in enumerate(ev.reference_ids[0]):
        assert ev.label_ids[0][i] == np.flatnonzero(O[r]).tolist()


def test_paper_form_weights_are_the_full_softmax(synthetic):
    ref, S_test = synthetic
    ev = retrieval_evidence(S_test, ref, top=5, top_k=None, logit_scale=1.0, chunk_size=50)
    logits = S_test @ ref.S_ref.T
    full = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(ev.weight, np.take_along_axis(full, ev.reference_ids, 1), rtol=1e-4)
    assert ev.weight.shape == (6, 5) and np.all(ev.covered < 0.1)   # tau=1: nearly flat over 240 segments
    # fewer neighbours than top_k shown: weights still use the top_k denominator
    ev3 = retrieval_evidence(S_test, ref, top=3, top_k=10, logit_scale=50.0)
    ev10 = retrieval_evidence(S_test, ref, top=10, top_k=10, logit_scale=50.0)
    np.testing.assert_allclose(ev3.weight, ev10.weight[:, :3], rtol=1e-5)
    assert np.all(ev3.covered < ev10.covered + 1e-6)


def test_padding_records_and_errors(synthetic):
    ref, S_test = synthetic
    small = ReferenceSet(S_ref=ref.S_ref[:4], L_ref=ref.L_ref, pair_segment=[0, 1, 2, 3], pair_label=[0, 1, 1, 2],
                         labels=ref.labels, roots=ref.roots, segment_image=["a.png"] * 4,
                         segment_bbox=np.tile([5, 6, 7, 8], (4, 1)), segment_area=np.full(4, 9))
    ev = retrieval_evidence(S_test, small, top=6, top_k=10, logit_scale=10.0)
    assert ev.reference_ids.shape == (6, 6) and np.all(ev.reference_ids[:, 4:] == -1)
    assert np.all(np.isnan(ev.similarity[:, 4:])) and np.allclose(ev.covered, 1.0, atol=1e-5)
    rec = ev.records(small, [2])
    assert len(rec) == 1 and rec[0]["segment"] == 2 and len(rec[0]["neighbours"]) == 4
    n0 = rec[0]["neighbours"][0]
    assert n0["image"] == "a.png" and n0["bbox"] == [5, 6, 7, 8] and n0["source"] == "unknown"
    json.dumps(ev.records(small))                                          # JSON-ready
    with pytest.raises(ValueError, match="dimension"):
        retrieval_evidence(S_test[:, :5], small)
    with pytest.raises(ValueError, match=">= 1"):
        retrieval_evidence(S_test, small, top=0)


def test_label_class_affinity_merges_synonyms_by_max():
    rng = np.random.default_rng(1)
    Lr, Lt = _unit(rng.normal(size=(4, 8))), _unit(rng.normal(size=(3, 8)))
    A2 = label_class_affinity(Lr, Lt, logit_scale=20.0)
    e = np.exp(20 * Lr @ Lt.T)
    np.testing.assert_allclose(A2, e / e.sum(1, keepdims=True), rtol=1e-5)
    merged = label_class_affinity(Lr, Lt, logit_scale=20.0, owner=[0, 1, 0])
    np.testing.assert_allclose(merged, np.stack([np.maximum(A2[:, 0], A2[:, 2]), A2[:, 1]], 1), rtol=1e-6)


@pytest.fixture(scope="module")
def segmenter():
    from reme.inference.segmenter import Segmenter

    return Segmenter(DEFAULT_REF, device="cpu")


def test_predict_evidence_explains_P_seg(segmenter):
    """P_seg recomputed from the evidence alone (neighbour weights x labels x A2) equals the
    segmenter's P_seg: the listed reference segments are exactly what decided each label."""
    from reme.encoders.text import embed_labels

    classes = ["person", "sky", "building", "tree", "road"]
    res = segmenter.predict(photo("astronaut"), classes, return_evidence=True)
    ev = res.evidence
    k = res.segment_scores.shape[0]
    assert ev.num_segments == k == res.segment_ids.max() + 1 and ev.reference_ids.shape == (k, 10)
    assert ev.support == 10 and ev.logit_scale == 50.0
    ref = segmenter.reference
    L_test = embed_labels(segmenter.text_encoder, classes, segmenter.templates)
    A2 = label_class_affinity(ref.L_ref, L_test, logit_scale=segmenter.label_logit_scale)
    t_none = segmenter.none_rule.label_threshold
    if t_none is not None:  # "none of these": the class columns of A2' = A2 (1 - p_none) (docs/method.md)
        import torch

        from reme.inference.unlabelled import none_share

        p = none_share(torch.as_tensor(ref.L_ref), torch.as_tensor(L_test), segmenter.label_logit_scale, t_none)
        A2 = A2 * (1 - p.numpy()[:, None])
    index = {lab: j for j, lab in enumerate(ref.labels)}
    P = np.array([sum(w * A2[index[lab]] for lab, w in ev.label_votes(i)) for i in range(k)])
    np.testing.assert_allclose(P, res.segment_scores, atol=2e-4)
    assert segmenter.predict(photo("astronaut"), classes).evidence is None
    # FAISS path without top_k: eq. 1's softmax runs over the index's candidates, and the evidence says so
    from reme.inference.retrieval import DEFAULT_TOPK_CANDIDATES
    from reme.inference.segmenter import Segmenter

    faiss_seg = Segmenter(segmenter.reference, visual_encoder=segmenter.visual_encoder,
                          text_encoder=segmenter.text_encoder, retrieval="topk", top_k=None, device="cpu")
    ev2 = faiss_seg.predict(photo("astronaut"), classes, return_evidence=True).evidence
    assert ev2.support == DEFAULT_TOPK_CANDIDATES and ev2.reference_ids.shape[1] == 10
    assert np.all((ev2.covered > 0) & (ev2.covered < 1))


def test_contact_sheet_crops_and_placeholders(segmenter):
    img = photo("coffee")
    res = segmenter.predict(img, "cup, table, wall", return_evidence=True)
    segs = largest_segments(res.segment_ids, 3)
    areas = np.bincount(res.segment_ids.ravel())
    assert areas[segs[0]] == areas.max() and areas[segs[0]] >= areas[segs[1]] >= areas[segs[2]]
    x, y, w, h = segment_bbox(res.segment_ids, segs[0])
    ys, xs = np.nonzero(res.segment_ids == segs[0])
    assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
    sheet = contact_sheet(img, res.segment_ids, res.evidence, segmenter.reference, segments=segs,
                          images=ReferenceImages([]), classes=res.classes, segment_scores=res.segment_scores, size=64)
    arr = np.asarray(sheet)
    assert sheet.width >= 11 * 72 and sheet.height > 3 * 64
    # unreadable reference photos: the first neighbour tile is the grey placeholder (225, grey text)
    tile = arr[22:22 + 64, 6 + 72 + 12 + 4:6 + 72 + 12 + 4 + 64].astype(int)
    assert np.all(tile[..., 0] == tile[..., 1]) and np.all(tile[..., 1] == tile[..., 2])
    assert (tile[..., 0] == 225).mean() > 0.5
    with pytest.raises(ValueError, match="does not occur"):
        segment_bbox(res.segment_ids, 10 ** 6)


@needs_shared
def test_contact_sheet_shows_reference_photos(segmenter):
    roots = image_roots_from_manifest(segmenter.reference.manifest)
    assert len(roots) == 3 and all(r.is_dir() for r in roots)              # "shared/data: a + b + c" form
    images = ReferenceImages(roots)
    ref = segmenter.reference
    for i in (0, ref.num_segments - 1):                                    # one COCO, one CamVid segment
        assert images.path(ref.segment_image[i]) is not None
    assert images.path("../secret.png") is None
    tile = np.asarray(images.thumbnail(ref.segment_image[0], ref.segment_bbox[0], 64))
    assert tile.shape == (64, 64, 3) and tile.std() > 10                    # a real crop, not a flat tile


def test_segment_explain_cli(tmp_path):
    from typer.testing import CliRunner

    from reme.cli import app

    src = tmp_path / "coffee.png"
    Image.fromarray(photo("coffee")).save(src)
    r = CliRunner().invoke(app, ["segment", str(src), "--classes", "cup, table, wall", "--out", str(tmp_path / "o"),
                                 "--explain", "--explain-segments", "4", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "o" / "coffee_evidence.json").read_text())
    seg_ids = np.array(Image.open(tmp_path / "o" / "coffee_segments.png"))
    assert seg_ids.shape == (400, 600) and len(doc["segments"]) == seg_ids.max() + 1
    assert doc["classes"] == ["cup", "table", "wall"] and doc["top_k"] == 10
    s0 = doc["segments"][0]
    assert s0["area"] == int((seg_ids == 0).sum()) and s0["class"] in doc["classes"] + [None]  # None: unlabelled
    assert (s0["class"] is None) == s0["unlabelled"]
    assert len(s0["neighbours"]) == 10 and {"image", "bbox", "labels", "similarity", "weight"} <= set(s0["neighbours"][0])
    labels = np.array(Image.open(tmp_path / "o" / "coffee_labels.png"))
    value = int(labels[seg_ids == 0][0])
    assert (doc["classes"][value] if value != 255 else None) == s0["class"]           # 255: unlabelled
    sheet = Image.open(tmp_path / "o" / "coffee_contact_sheet.png")
    assert sheet.height > 4 * 112 and sheet.width > 10 * 112
