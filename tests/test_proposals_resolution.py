"""Felzenszwalb at a reduced working resolution (``max_pixels``), an opt-in speed option."""

from __future__ import annotations

import numpy as np
import pytest

from reme.proposals import FelzenszwalbParams, ProposalGenerator, felzenszwalb_segments
from conftest import photo


def test_at_or_above_the_image_size_nothing_changes():
    img = photo("coffee")
    full = felzenszwalb_segments(img)
    assert np.array_equal(full, felzenszwalb_segments(img, max_pixels=img.shape[0] * img.shape[1]))
    assert np.array_equal(full, felzenszwalb_segments(img, FelzenszwalbParams(), None))


def test_reduced_resolution_gives_a_full_size_partition_with_scaled_parameters():
    img = photo("coffee")
    h, w = img.shape[:2]
    full = felzenszwalb_segments(img)
    half = felzenszwalb_segments(img, max_pixels=h * w // 4)
    assert half.shape == (h, w) and half.dtype == np.int32
    assert np.array_equal(np.unique(half), np.arange(half.max() + 1))
    k_full, k_half = full.max() + 1, half.max() + 1
    # scale and min_size follow the area, so the count of segments stays of the same order
    assert k_full / 3 < k_half < k_full * 3
    # ids were upsampled by nearest neighbour: constant over each 2 x 2 block of the small grid
    assert (half[:-1:2, :-1:2] == half[1::2, 1::2]).mean() > 0.9


def test_generator_passes_max_pixels_and_checks_it():
    img = photo("coffee")
    gen = ProposalGenerator("felzenszwalb", max_pixels=20_000)
    assert np.array_equal(gen(img).segment_ids, felzenszwalb_segments(img, FelzenszwalbParams(), 20_000))
    with pytest.raises(ValueError, match="max_pixels"):
        ProposalGenerator("felzenszwalb", max_pixels=0)
    with pytest.raises(ValueError, match="max_pixels"):
        felzenszwalb_segments(img, max_pixels=0)
