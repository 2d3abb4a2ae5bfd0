"""SAM proposals through transformers with a tiny random SAM saved to a local folder."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import photo
from reme.errors import MissingWeightsError


def test_sam_masks_cover_the_image(tiny_sam):
    from reme.proposals.sam import SamProposals

    gen = SamProposals(str(tiny_sam), points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0,
                       stability_score_thresh=0.0, device="cpu")
    img = photo("coffee")[:120, :160]
    masks = gen.masks(img)
    assert masks.dtype == bool and masks.shape[1:] == (120, 160) and masks.shape[0] >= 1
    assert masks.any(axis=0).all(), "every pixel must belong to some proposal"
    assert gen.spec == f"sam:{tiny_sam}"


def test_sam_missing_weights_fail_fast(tmp_path, monkeypatch):
    from reme.proposals.sam import SamProposals

    monkeypatch.setenv("REME_CACHE_DIR", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="sam"):
        SamProposals("facebook/sam-vit-huge")
    with pytest.raises(MissingWeightsError):
        SamProposals(str(tmp_path / "missing"))


SAM_TEST_OPTIONS = {"points_per_side": 4, "points_per_batch": 16, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def _whole_and_left_half(self, image):
    """Two overlapping masks (the whole image, its left half): stands in for SAM's output."""
    H, W = image.shape[:2]
    left = np.zeros((H, W), bool)
    left[:, : W // 2] = True
    return np.stack([np.ones((H, W), bool), left])


def test_sam_proposals_in_gt_and_caption_builds(tiny_sam, tiny_clip, tmp_path, monkeypatch):
    """docs/method.md step 1's SAM option in the build: overlapping masks are labelled, pooled and
    paired as masks; the manifest records the method and the Segmenter uses it by default."""
    import json

    from PIL import Image

    from conftest import TINY_CLIP
    from reme.build.pipeline import CaptionBuildParams, build_caption_reference, build_gt_reference
    from reme.encoders import resolve_encoder
    from reme.encoders.pooling import masks_average_pool
    from reme.proposals.sam import SamProposals
    from reme.inference.segmenter import Segmenter
    from test_build_resume import HashText, make_dataset

    imgs, ann = make_dataset(tmp_path / "d", n=2, size=(48, 64))
    monkeypatch.setattr(SamProposals, "masks", _whole_and_left_half)   # the tiny SAM's own masks barely overlap
    vis = resolve_encoder("classical:size=48,stride=8", device="cpu")
    method = f"sam:{tiny_sam}"
    ref = build_gt_reference(imgs, ann, vis, HashText(), proposals=method, sam_options=SAM_TEST_OPTIONS,
                             out=tmp_path / "gt", min_purity=0.0, progress=False)
    assert ref.manifest["proposals"] == {"method": method, "n_clusters": 8, "sam_options": SAM_TEST_OPTIONS}
    # the first photo's rows are the masks average-pooled on their own (no flattening)
    img = np.asarray(Image.open(imgs / "img00.png"))
    masks = SamProposals(str(tiny_sam), **SAM_TEST_OPTIONS).masks(img)
    want = masks_average_pool(vis.dense_features(img), masks).numpy()
    rows = [i for i, name in enumerate(ref.segment_image) if name == "img00.png"]
    assert len(rows) == len(masks) == 2                              # min_purity 0: every mask kept
    np.testing.assert_allclose(np.asarray(ref.S_ref, np.float32)[rows], want, atol=2e-3)  # float16 storage
    np.testing.assert_array_equal(ref.segment_area[rows], [48 * 64, 48 * 32])
    seg = Segmenter(tmp_path / "gt", text_encoder=HashText(), device="cpu")
    assert seg.proposals == method and seg.overlapping_proposals and seg.proposer.sam.points_per_side == 4
    assert seg.predict(img, ["dark", "bright"]).label_map.shape == img.shape[:2]

    with open(tmp_path / "caps.jsonl", "w") as fh:
        for i in range(2):
            fh.write(json.dumps({"image": f"img{i:02d}.png", "captions": ["a brown cat next to the blue sky."]}) + "\n")
    cap = resolve_encoder(f"captions:{tmp_path / 'caps.jsonl'}", device="cpu")
    clip = resolve_encoder(f"clip:{TINY_CLIP}:{tiny_clip[0]}", device="cpu")
    cref = build_caption_reference(imgs, cap, clip, vis, HashText(), params=CaptionBuildParams(k_sim=0, knee_filter=False),
                                   proposals=method, sam_options=SAM_TEST_OPTIONS, out=tmp_path / "cap",
                                   progress=False)
    c = cref.manifest["counts"]
    assert c["proposals"] == 2 * 2 and c["pairs"] == 4 and cref.num_segments >= 1
    assert set(cref.segment_source) == {"caption_pairing"}
