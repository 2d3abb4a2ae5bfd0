"""SAM proposals through transformers with a tiny random SAM saved to a local folder."""

from __future__ import annotations

import pytest

from conftest import photo
from reme.errors import MissingWeightsError


def test_sam_masks_cover_the_image(tiny_sam):
    from reme.proposals_sam import SamProposals

    gen = SamProposals(str(tiny_sam), points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0,
                       stability_score_thresh=0.0, device="cpu")
    img = photo("coffee")[:120, :160]
    masks = gen.masks(img)
    assert masks.dtype == bool and masks.shape[1:] == (120, 160) and masks.shape[0] >= 1
    assert masks.any(axis=0).all(), "every pixel must belong to some proposal"
    assert gen.spec == f"sam:{tiny_sam}"


def test_sam_missing_weights_fail_fast(tmp_path, monkeypatch):
    from reme.proposals_sam import SamProposals

    monkeypatch.setenv("REME_CACHE_DIR", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="sam"):
        SamProposals("facebook/sam-vit-huge")
    with pytest.raises(MissingWeightsError):
        SamProposals(str(tmp_path / "missing"))
