"""Metric code against hand-computed confusion matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reme.eval.metrics import ConfusionMeter, confusion_matrix, majority_scores, scores_from_confusion


def test_confusion_matrix_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    cm = confusion_matrix(gt, pred, 3)
    # valid pixels: 0->0, 0->1, 1->1, 1->1, 2->0 ; the 255 pixel is skipped
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    s = scores_from_confusion(cm)
    # IoU_0 = 1 / (2 + 2 - 1), IoU_1 = 2 / (2 + 3 - 2), IoU_2 = 0 / (1 + 0 - 0)
    assert s["iou"] == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert s["miou"] == pytest.approx(100 / 3)
    assert s["pixel_acc"] == pytest.approx(60.0)
    assert s["acc"] == pytest.approx([50.0, 100.0, 0.0])
    assert s["mean_acc"] == pytest.approx(50.0)
    assert s["num_pixels"] == 5


def test_absent_classes_are_nan_and_left_out():
    gt = np.zeros((2, 2), int)
    cm = confusion_matrix(gt, gt, 3)
    s = scores_from_confusion(cm)
    assert s["miou"] == pytest.approx(100.0)
    assert math.isnan(s["iou"][1]) and math.isnan(s["iou"][2])
    assert math.isnan(s["acc"][2])
    # a class predicted but absent from GT has IoU 0 (union > 0) and counts in the mean
    cm2 = confusion_matrix(gt, np.array([[0, 0], [0, 2]]), 3)
    assert scores_from_confusion(cm2)["iou"][2] == 0.0
    assert scores_from_confusion(cm2)["miou"] == pytest.approx((75.0 + 0.0) / 2)


def test_extra_prediction_column_counts_as_miss_only():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 2])                       # 2 = "others" / distractor answer
    cm = confusion_matrix(gt, pred, 2, num_pred_classes=3)
    assert cm.tolist() == [[1, 0, 1], [0, 1, 1], [0, 0, 0]]
    s = scores_from_confusion(cm, num_classes=2)
    assert s["iou"] == pytest.approx([50.0, 50.0])    # 1 / (2 + 1 - 1) each
    assert s["pixel_acc"] == pytest.approx(50.0)
    assert len(s["iou"]) == 2
    with pytest.raises(ValueError):
        confusion_matrix(gt, pred, 2)                    # 2 is outside [0, 2) without the column


def test_meter_streams_and_matches_sum():
    rng = np.random.default_rng(0)
    meter = ConfusionMeter(4, ignore_index=-1)
    total = np.zeros((4, 4), np.int64)
    for _ in range(3):
        gt = rng.integers(-1, 4, (5, 6))
        pred = rng.integers(0, 4, (5, 6))
        total += confusion_matrix(gt, pred, 4, ignore_index=-1)
        meter.update(gt, pred)
    assert np.array_equal(meter.cm, total)
    assert meter.scores() == scores_from_confusion(total)


def test_majority_and_bad_arguments():
    cm = np.array([[5, 1], [2, 2]])
    cls, s = majority_scores(cm)
    assert cls == 0
    assert s["pixel_acc"] == pytest.approx(60.0)      # 6 of 10 pixels are class 0
    assert s["miou"] == pytest.approx((60.0 + 0.0) / 2)
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError):
        scores_from_confusion(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        ConfusionMeter(3, num_pred_classes=2)
