"""Step-7 variants in a real caption-mode build: CLIP-score baselines and relabel-instead-of-drop."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SHARED, TINY_CLIP, needs_shared
from reme.build.pipeline import CaptionBuildParams, build_caption_reference
from reme.encoders import resolve_encoder

pytestmark = needs_shared
COCO = SHARED / "coco_tiny"


@pytest.fixture(scope="module")
def setup(tiny_clip, classical, minilm):
    ckpt, _ = tiny_clip
    clip = resolve_encoder(f"clip:{TINY_CLIP}:{ckpt}", device="cpu")
    cap = resolve_encoder(f"captions:{SHARED / 'captions' / 'coco_captions.jsonl'}", device="cpu")
    keys = sorted(p.name for p in (COCO / "images" / "train2017").glob("*.jpg"))[:6]

    def build(**kw):
        return build_caption_reference(COCO / "images" / "train2017", cap, clip, classical, minilm, images=keys,
                                       params=CaptionBuildParams(k_sim=0, knee_filter=False, **kw), progress=False)
    return build


def test_clip_score_baselines_drop_the_configured_fraction(setup):
    for method in ("clip_global", "clip_group"):
        ref = setup(filter_method=method)
        c = ref.manifest["counts"]
        dropped = c["pairs"] - c["pairs_after_group_filter"]
        if method == "clip_global":
            assert dropped == int(np.floor(0.3 * c["pairs"] + 1e-9))
        else:
            assert 0 < dropped <= int(np.floor(0.3 * c["pairs"] + 1e-9))
        assert len(ref.dropped["label"]) == dropped
    with pytest.raises(ValueError, match="filter_method"):
        CaptionBuildParams(filter_method="nope")


def test_relabel_keeps_pairs_the_filter_dropped(setup):
    base = setup()
    rel = setup(relabel=True, relabel_min_similarity=0.0)
    cb, cr = base.manifest["counts"], rel.manifest["counts"]
    n_drop = cb["pairs"] - cb["pairs_after_group_filter"]
    assert cr["pairs_relabelled"] == n_drop > 0          # threshold 0: every dropped pair is relabelled
    assert len(rel.dropped["label"]) == 0 and rel.manifest["counts"]["final_pairs"] >= cb["final_pairs"]
    strict = setup(relabel=True, relabel_min_similarity=1.01)
    assert strict.manifest["counts"]["pairs_relabelled"] == 0
    assert len(strict.dropped["label"]) == n_drop
