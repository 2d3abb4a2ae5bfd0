"""Protocol pieces: resize, sliding windows, probability averaging, query plans, thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reme.eval import Protocol, benchmark_protocol
from reme.eval.protocol import (
    finalize_labels,
    make_plan,
    memoized_features,
    normalise_rows,
    predict_image,
    resized_shape,
    slide_windows,
)
from reme.inference.maps import upsample_nearest


def test_resized_shape_follows_mmseg_rule():
    assert resized_shape(480, 640, 336) == (336, 448)
    assert resized_shape(360, 480, 336) == (336, 448)
    assert resized_shape(513, 513, 336) == (336, 336)
    assert resized_shape(1024, 2048, 560) == (560, 1120)
    assert resized_shape(100, 5000, 336) == (41, 2048)          # long side capped at 2048
    assert resized_shape(360, 480, None) == (360, 480)


@pytest.mark.parametrize("h,w,crop,stride", [(336, 448, 336, 112), (336, 336, 336, 112), (200, 150, 336, 112),
                                             (560, 1120, 336, 112), (50, 77, 16, 5)])
def test_slide_windows_cover_every_pixel(h, w, crop, stride):
    wins = slide_windows(h, w, crop, stride)
    cover = np.zeros((h, w), int)
    for y0, y1, x0, x1 in wins:
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        assert (y1 - y0, x1 - x0) == (min(crop, h), min(crop, w))
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    assert len(slide_windows(336, 448, 336, 112)) == 2         # mmseg: (448 - 336 + 111) // 112 + 1


class ColumnSegmenter:
    """Fake segmenter: one segment per image column; P_seg row = fixed per *absolute* column
    (the crop offset is recovered from a marker channel), so averaging over crops is exact."""

    def __init__(self, num_classes: int):
        self.C = num_classes
        self.calls = []

    def segment_scores(self, image, classes):
        self.calls.append(image.shape)
        h, w = image.shape[:2]
        cols = image[0, :, 0].astype(np.int64)                  # absolute column index stored in red
        ids = np.tile(np.arange(w, dtype=np.int32), (h, 1))
        P = torch.zeros((w, len(classes)))
        P[torch.arange(w), torch.as_tensor(cols % len(classes))] = 3.0
        P += 1.0
        return ids, P, list(classes)


def test_predict_image_whole_and_slide_agree_on_consistent_probs():
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :, 0] = np.arange(40)[None, :]
    queries = ["a", "b", "c"]
    seg = ColumnSegmenter(3)
    lab_w, conf_w = predict_image(seg, img, queries, Protocol(short_side=None))
    slide = Protocol(short_side=None, mode="slide", crop=16, stride=8)
    lab_s, conf_s = predict_image(seg, img, queries, slide)
    assert len(seg.calls) == 1 + len(slide_windows(20, 40, 16, 8))
    assert np.array_equal(lab_w, np.tile(np.arange(40) % 3, (20, 1)))
    assert np.array_equal(lab_s, lab_w)
    assert np.allclose(conf_w, 4.0 / 6.0) and np.allclose(conf_s, conf_w)   # (3 + 1) / (3 + 1 + 1 + 1)


def test_extra_segmenter_columns_are_dropped():
    class OthersSegmenter(ColumnSegmenter):
        def segment_scores(self, image, classes):
            ids, P, names = super().segment_scores(image, classes)
            return ids, torch.cat([P, torch.full((P.shape[0], 1), 100.0)], 1), names + ["others"]

    img = np.zeros((4, 6, 3), np.uint8)
    img[:, :, 0] = np.arange(6)[None, :]
    lab, conf = predict_image(OthersSegmenter(2), img, ["a", "b"], Protocol(short_side=None))
    assert lab.max() < 2 and np.allclose(conf, 4.0 / 5.0)


def test_normalise_rows_and_upsample():
    P = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(normalise_rows(P)[0], torch.tensor([0.5, 0.5, 0.0]))
    assert torch.all(normalise_rows(P)[1] == 0)
    a = np.array([[1, 2], [3, 4]])
    assert upsample_nearest(a, (4, 4)).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    assert upsample_nearest(a, (2, 2)) is a


def test_plan_background_modes_and_thresholds():
    classes = [["background"], ["cat", "kitty"], ["dog"]]
    thr = make_plan(classes, 0, Protocol(background="threshold", bg_threshold=0.6))
    assert thr.queries == ["cat; kitty", "dog"] and thr.query_class.tolist() == [1, 2]
    assert thr.background_index == 0 and thr.unmatched is None
    label_q = np.array([[0, 1], [1, 0]])
    conf = np.array([[0.9, 0.5], [0.7, 0.59]])
    assert finalize_labels(label_q, conf, thr).tolist() == [[1, 0], [2, 0]]
    assert finalize_labels(label_q, conf, thr, bg_threshold=0.0).tolist() == [[1, 2], [2, 1]]
    cls = make_plan(classes, 0, Protocol(background="class", synonyms=False))
    assert cls.queries == ["background", "cat", "dog"] and cls.background_index is None
    both = make_plan(classes, 0, Protocol(background="class+threshold"))
    assert len(both.queries) == 3 and both.background_index == 0
    nobg = make_plan(classes[1:], None, Protocol(others_threshold=0.5), extra_queries=["car", "tree"])
    assert nobg.query_class.tolist() == [0, 1, 2, 2] and nobg.unmatched == 2 and nobg.num_pred_classes == 3
    out = finalize_labels(np.array([0, 2, 1]), np.array([0.9, 0.9, 0.4]), nobg)
    assert out.tolist() == [0, 2, 2]                              # distractor win and "others" both -> 2


def test_protocol_validation_and_defaults():
    assert benchmark_protocol("ade150").short_side == 448
    assert benchmark_protocol("cityscapes").short_side == 560
    assert benchmark_protocol("voc21").short_side == 336
    assert benchmark_protocol("voc21", mode="slide").mode == "slide"
    for bad in (dict(mode="tiles"), dict(background="none"), dict(bg_threshold=1.5), dict(crop=64, stride=65),
                dict(short_side=0)):
        with pytest.raises(ValueError):
            Protocol(**bad)
    with pytest.raises(ValueError):
        benchmark_protocol("voc2007")


def test_memoized_features_computes_once_per_image():
    class Enc:
        spec, dim = "fake", 2
        n = 0

        def dense_features(self, image):
            Enc.n += 1
            return torch.zeros(1, 1, 2)

    class Seg:
        visual_encoder = Enc()

    seg = Seg()
    img = np.zeros((4, 4, 3), np.uint8)
    with memoized_features(seg):
        for _ in range(3):
            seg.visual_encoder.dense_features(img)
        seg.visual_encoder.dense_features(img + 1)
        assert seg.visual_encoder.spec == "fake"
    assert Enc.n == 2 and isinstance(seg.visual_encoder, Enc)
