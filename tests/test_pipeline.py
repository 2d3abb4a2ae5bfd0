"""End-to-end pipeline on real photos: GT-mode and caption-mode builds, then segmentation."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SHARED, TINY_CLIP, needs_shared
from reme.build.annotations import CocoInstances, MaskFolder, decode_coco_rle, read_class_names
from reme.build.pipeline import CaptionBuildParams, build_caption_reference, build_gt_reference
from reme.encoders import resolve_encoder
from reme.inference.segmenter import Segmenter

pytestmark = needs_shared
COCO = SHARED / "coco_tiny"
CAMVID = SHARED / "camvid"


@pytest.fixture(scope="module")
def coco_train():
    ann = CocoInstances(COCO / "annotations" / "instances_train2017.json")
    return ann, ann.keys()[:4]


def test_gt_reference_from_coco_then_segment(tmp_path, coco_train, classical, minilm):
    ann, keys = coco_train
    ref = build_gt_reference(COCO / "images" / "train2017", ann, classical, minilm, images=keys, progress=False)
    names = set(ann.label_names)
    assert ref.num_segments > 50 and set(ref.labels) <= names
    assert np.allclose(np.linalg.norm(ref.S_ref, axis=1), 1, atol=1e-4)
    # every reference segment's label is the majority GT label inside it (with purity >= 0.5): the
    # proposals are recomputed (Felzenszwalb is deterministic) and matched by box and area
    from reme.io import load_image
    from reme.proposals import FelzenszwalbParams, felzenszwalb_segments, segment_bboxes

    label_of = dict(zip(ref.pair_segment.tolist(), ref.pair_label.tolist()))
    assert len(label_of) == ref.num_segments == len(ref.pair_segment)          # GT mode: one label per segment
    checked = 0
    for key in keys:
        img = load_image(COCO / "images" / "train2017" / key)
        gt = ann.label_map(key, img.shape[:2])
        props = felzenszwalb_segments(img, FelzenszwalbParams(**ref.manifest["felzenszwalb"]))
        boxes = {(tuple(b), int(a)): i for i, (b, a) in
                 enumerate(zip(segment_bboxes(props).tolist(), np.bincount(props.ravel()).tolist()))}
        for s in np.flatnonzero(np.array(ref.segment_image) == key):
            i = boxes[(tuple(ref.segment_bbox[s].tolist()), int(ref.segment_area[s]))]
            inside = gt[props == i]
            counts = np.bincount(inside[inside >= 0], minlength=len(ann.label_names))
            assert ref.labels[label_of[s]] == ann.label_names[counts.argmax()], (key, s)
            assert counts.max() >= 0.5 * inside.size
            checked += 1
    assert checked == ref.num_segments
    ref.save(tmp_path / "ref")
    seg = Segmenter(tmp_path / "ref", device="cpu", unlabelled=False)   # eqs. 1-3: every pixel assigned
    val = sorted((COCO / "images" / "val2017").glob("*.jpg"))[0]
    res = seg.predict(val, ["person", "dog", "sky; clouds", "pizza"], return_scores=True)
    H, W = res.label_map.shape
    assert res.scores.shape == (H, W, 4) and res.label_map.dtype == np.int32
    assert res.label_map.min() >= 0 and res.label_map.max() < 4
    assert np.array_equal(res.scores.argmax(-1), res.label_map)
    assert abs(res.class_fractions.sum() - 1) < 1e-9


def test_gt_masks_mode_and_background_label(coco_train, classical, minilm):
    ann, keys = coco_train
    ref = build_gt_reference(COCO / "images" / "train2017", ann, classical, minilm, images=keys[:2],
                             segments="masks", progress=False)
    n_inst = sum(1 for k in keys[:2] for a in ann.anns[k] if not a.get("iscrowd"))
    assert ref.num_segments == n_inst
    ref_bg = build_gt_reference(COCO / "images" / "train2017", ann, classical, minilm, images=keys[:2],
                                background_label="background", progress=False)
    assert "background" in ref_bg.labels


def test_gt_reference_from_mask_folder_retrieves_camvid(classical, minilm):
    """A GT reference of 6 CamVid frames labels a 7th far better than the majority class."""
    names = read_class_names(CAMVID / "classes.txt")
    frames = sorted(p.name for p in (CAMVID / "images" / "train").glob("*.png"))
    ref = build_gt_reference(CAMVID / "images" / "train", MaskFolder(CAMVID / "masks" / "train", names),
                             classical, minilm, images=frames[-7:-1], progress=False)
    seg = Segmenter(ref, device="cpu")
    from PIL import Image

    gt = np.array(Image.open(CAMVID / "masks" / "train" / frames[-1]))
    pred = seg.predict(CAMVID / "images" / "train" / frames[-1], names).label_map
    valid = gt != 255
    acc = (pred[valid] == gt[valid]).mean()
    majority = np.bincount(gt[valid]).max() / valid.sum()
    assert acc > majority + 0.15, (acc, majority)


def test_caption_mode_with_caption_file_and_tiny_clip(tiny_clip, classical, minilm):
    ckpt, _ = tiny_clip
    clip = resolve_encoder(f"clip:{TINY_CLIP}:{ckpt}", device="cpu")
    cap = resolve_encoder(f"captions:{SHARED / 'captions' / 'coco_captions.jsonl'}", device="cpu")
    keys = sorted(p.name for p in (COCO / "images" / "train2017").glob("*.jpg"))[:6]
    ref = build_caption_reference(COCO / "images" / "train2017", cap, clip, classical, minilm, images=keys,
                                  params=CaptionBuildParams(k_sim=5), progress=False)
    c = ref.manifest["counts"]
    assert c["captions"] >= 5 * 6 and c["noun_phrases"] > 20
    assert c["pairs_after_group_filter"] < c["pairs"]                      # delta = 30 % dropped something
    assert c["pairs_after_synonyms"] > c["pairs_after_knee_filter"]         # k_sim = 5 added labels
    assert len(ref.manifest["synonym_pairs"]) == 5
    assert ref.manifest["encoders"]["pairing"] == clip.spec
    assert ref.num_labels > 10 and all(isinstance(t, str) for t in ref.labels)
    # provenance: every removed pair is listed with its reason; kept segments say where they came from
    assert len(ref.dropped["label"]) == c["pairs"] - c["pairs_after_knee_filter"]
    assert "group_filter" in ref.dropped["reason"] and set(ref.dropped["reason"]) <= {"group_filter", "knee_filter"}
    assert set(ref.segment_source) == {"caption_pairing"}
    gf = np.array(ref.dropped["reason"]) == "group_filter"
    assert np.all(np.isfinite(ref.dropped["score"][gf]))


def test_caption_mode_with_tiny_llava_on_three_photos(tiny_llava, tiny_clip, classical, minilm):
    folder = tiny_llava[0] if isinstance(tiny_llava, tuple) else tiny_llava
    llava = resolve_encoder(f"llava:{folder}", device="cpu", max_new_tokens=8)
    ckpt, _ = tiny_clip
    clip = resolve_encoder(f"clip:{TINY_CLIP}:{ckpt}", device="cpu")
    keys = sorted(p.name for p in (COCO / "images" / "val2017").glob("*.jpg"))[:3]
    ref = build_caption_reference(COCO / "images" / "val2017", llava, clip, classical, minilm, images=keys,
                                  progress=False)
    c = ref.manifest["counts"]
    assert c["images"] == 3 and c["images_skipped"] == 0
    assert c["captions"] <= 3  # one generated caption per photo (random weights: gibberish, maybe none)
    assert ref.manifest["encoders"]["captioner"].startswith("llava:")


def test_coco_rle_decoding():
    # 3x4 mask, column-major runs: 2 zeros, 3 ones, 7 zeros
    m = decode_coco_rle({"counts": [2, 3, 7], "size": [3, 4]}, 3, 4)
    expect = np.zeros(12, bool)
    expect[2:5] = True
    np.testing.assert_array_equal(m, expect.reshape(4, 3).T)
