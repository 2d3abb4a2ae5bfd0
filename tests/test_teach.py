"""The add-examples loop as a Python API (issue 21): resume, periodic saves, Ctrl-C, void-like
labels left out (issue 22). A duck-typed Segmenter (no models) records what it is asked."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from reme.inference.teach import TeachInterrupted, labels_to_leave_out, teach_from_annotations
from reme.reference.overlay import Overlay, load_overlay
from test_overlay_transactions import add_one, tiny_base


class Ann:
    """Annotations whose label map is value 0 ('void') on the left half, 1 ('cat') on the right."""

    label_names = ["void", "cat"]

    def label_map(self, key, shape):
        lm = np.zeros(shape, np.int32)
        lm[:, shape[1] // 2:] = 1
        return lm


class FakeSeg:
    def __init__(self, folder, interrupt_at=None):
        self.overlay = Overlay.empty(tiny_base())
        self.overlay.path = folder
        if (folder / "manifest.json").is_file():
            self.overlay = load_overlay(folder)
        self.saves, self.seen, self.interrupt_at = 0, [], interrupt_at

    def add_examples(self, img, lm, names, *, min_purity, image_name):
        if len(self.seen) == self.interrupt_at:
            raise KeyboardInterrupt
        self.seen.append((image_name, sorted({names[v] for v in np.unique(lm) if v >= 0})))
        eid = add_one(self.overlay, "cat", len(self.seen))
        self.overlay.images[-1] = image_name
        return eid

    def save_overlay(self):
        self.saves += 1
        return self.overlay.save()


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(5):
        Image.fromarray(np.full((6, 8, 3), 40 * i, np.uint8)).save(d / f"p{i}.png")
    return d, [f"p{i}.png" for i in range(5)]


def test_saves_periodically_resumes_and_leaves_void_out(tmp_path, photos):
    d, keys = photos
    folder = tmp_path / "ov"
    seg = FakeSeg(folder, interrupt_at=3)
    with pytest.warns(UserWarning, match="'void' looks like 'unlabelled'"):
        with pytest.raises(TeachInterrupted) as exc:
            teach_from_annotations(seg, d, Ann(), keys, save_every=2)
    assert exc.value.stats.images_added == 3 and seg.saves == 2             # one periodic save, one at Ctrl-C
    assert all(labels == ["cat"] for _, labels in seg.seen)                  # void pixels were not taught
    assert len(load_overlay(folder).examples()) == 3                         # Ctrl-C saved what was added
    again = FakeSeg(folder)
    with pytest.warns(UserWarning):
        stats = teach_from_annotations(again, d, Ann(), keys, save_every=0)
    assert [k for k, _ in again.seen] == ["p3.png", "p4.png"]                # resumed
    assert stats.images_skipped == 3 and stats.rows_added == 2 and stats.left_out == ["void"]
    assert len(load_overlay(folder).examples()) == 5


def test_void_like_labels_are_opt_in():
    assert labels_to_leave_out(["void", "cat"], include=["VOID"]) == []
    assert labels_to_leave_out(["void", "cat"], exclude=["cat"], include=["void"]) == ["cat"]


def test_unreadable_photo_is_skipped_and_reported(tmp_path, photos):
    d, keys = photos
    (d / "p2.png").write_bytes(b"not a png")
    seen = []
    stats = teach_from_annotations(FakeSeg(tmp_path / "ov"), d, Ann(), keys, include=["void"],
                                   on_unreadable=lambda k, e: seen.append(k))
    assert seen == ["p2.png"] and stats.images_unreadable == 1 and stats.images_added == 4
