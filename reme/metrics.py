"""Segmentation metrics from a streamed confusion matrix (mIoU, pixel accuracy)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction.

    Args:
        gt: (H, W) int labels; pixels equal to ``ignore_index`` or outside [0, num_classes)
            are skipped.
        pred: (H, W) int predicted labels in [0, num_classes).
    """
    if gt.shape != pred.shape:
        raise ValueError(f"gt {gt.shape} and pred {pred.shape} differ in shape")
    gt = gt.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    valid = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    if np.any((pred[valid] < 0) | (pred[valid] >= num_classes)):
        raise ValueError(f"predictions outside [0, {num_classes})")
    return np.bincount(gt[valid] * num_classes + pred[valid], minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores_from_confusion(cm: np.ndarray) -> dict:
    """mIoU, per-class IoU, pixel accuracy and mean accuracy from a confusion matrix.

    IoU_c = TP / (TP + FP + FN). Classes absent from both ground truth and prediction get IoU
    NaN and are left out of the mean (mmseg convention).

    Returns:
        dict with ``miou`` (float, %), ``iou`` (list, %, NaN for absent classes),
        ``pixel_acc`` (%), ``mean_acc`` (%), ``num_pixels`` (int).
    """
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    gt_count, pred_count = cm.sum(1), cm.sum(0)
    union = gt_count + pred_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_count > 0, tp / gt_count, np.nan)
    total = cm.sum()
    return {
        "miou": float(np.nanmean(iou) * 100) if np.any(~np.isnan(iou)) else float("nan"),
        "iou": (iou * 100).tolist(),
        "pixel_acc": float(tp.sum() / total * 100) if total else float("nan"),
        "mean_acc": float(np.nanmean(acc) * 100) if np.any(~np.isnan(acc)) else float("nan"),
        "num_pixels": int(total),
    }
