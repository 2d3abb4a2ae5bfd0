"""SAM proposals through transformers with a tiny random SAM saved to a local folder."""

from __future__ import annotations

import pytest
import torch

from conftest import photo
from reme.errors import MissingWeightsError


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    cfg = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                           window_size=7, global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sam") / "tiny-sam"
    SamModel(cfg).eval().save_pretrained(folder)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(folder)
    return folder


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
