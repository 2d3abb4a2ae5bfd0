"""Input handling: images of every kind, class lists, proposals and pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo
from reme.classes import parse_classes
from reme.errors import ImageReadError
from reme.io import load_image
from reme.encoders.pooling import mask_average_pool, masks_average_pool
from reme.proposals import FelzenszwalbParams, felzenszwalb_segments, masks_from_segment_ids, segment_bboxes


@pytest.fixture
def rgb():
    return photo("chelsea")[:60, :80]


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_modes_become_rgb(tmp_path, rgb, mode):
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257))
    else:
        img = img.convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.shape == (60, 80, 3) and out.dtype == np.uint8


def test_exif_rotation_applied(tmp_path, rgb):
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (80, 60, 3)


def test_bad_files_raise_clear_errors(tmp_path, rgb):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        load_image(tmp_path / "empty.jpg")
    Image.fromarray(rgb).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="cannot decode"):
        load_image(tmp_path / "trunc.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageReadError):
        load_image(tmp_path / "text.jpg")
    with pytest.raises(ImageReadError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageReadError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))


def test_tiny_image_segments(tmp_path):
    seg = felzenszwalb_segments(np.zeros((1, 1, 3), np.uint8))
    assert seg.shape == (1, 1) and seg.max() == 0


def test_class_list_validation():
    assert parse_classes("cat, dog ,striped rug") == (["cat", "dog", "striped rug"], [["cat"], ["dog"], ["striped rug"]])
    names, syns = parse_classes(["person; people;man", "sky"])
    assert names == ["person", "sky"] and syns[0] == ["person", "people", "man"]
    for bad, msg in [("", "empty"), (" , ", "empty"), ([], "empty"), ("cat,dog,Cat", "twice"), ("cat\x1b", "control")]:
        with pytest.raises(ValueError, match=msg):
            parse_classes(bad)
    with pytest.warns(UserWarning, match="#2 is empty"):            # issue 22: ignored with a warning
        assert parse_classes("cat,,dog")[0] == ["cat", "dog"]


def test_felzenszwalb_partition_and_boxes():
    img = photo("coffee")
    seg = felzenszwalb_segments(img, FelzenszwalbParams.preset("voc"))
    k = seg.max() + 1
    assert seg.dtype == np.int32 and set(np.unique(seg)) == set(range(k))
    boxes = segment_bboxes(seg)
    ys, xs = np.nonzero(seg == 3)
    assert tuple(boxes[3]) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    with pytest.raises(ValueError, match="preset"):
        FelzenszwalbParams.preset("nope")


def test_mask_average_pool_matches_dense_masks():
    rng = np.random.default_rng(0)
    H, W, h, w, d = 37, 50, 5, 7, 6
    seg = rng.integers(0, 9, (H, W)).astype(np.int32)
    feats = torch.tensor(rng.normal(size=(h, w, d)), dtype=torch.float32)
    # reference: nearest-cell upsampling of the features, then plain average inside each mask
    rows = np.minimum(np.arange(H) * h // H, h - 1)
    cols = np.minimum(np.arange(W) * w // W, w - 1)
    up = feats.numpy()[rows][:, cols]
    expect = np.stack([up[seg == i].mean(0) for i in range(9)])
    got = mask_average_pool(feats, seg, normalize=False).numpy()
    np.testing.assert_allclose(got, expect, atol=1e-5)
    got2 = masks_average_pool(feats, masks_from_segment_ids(seg), normalize=False).numpy()
    np.testing.assert_allclose(got2, expect, atol=1e-5)
    unit = mask_average_pool(feats, seg).numpy()
    assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)


def test_sam_hint_shows_the_spec_with_its_colon(tmp_path):
    """The SAM folder hint said 'sam<dir>' (issue 22); a spec is 'sam:<dir>'."""
    pytest.importorskip("transformers")
    from reme.errors import MissingWeightsError
    from reme.proposals.sam import SamProposals

    with pytest.raises(MissingWeightsError, match="'sam:<dir>'"):
        SamProposals(str(tmp_path / "no-such-sam"))
