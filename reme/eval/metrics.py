"""Segmentation metrics from a streamed confusion matrix (mIoU, pixel accuracy).

The matrix is accumulated image by image (`confusion_matrix` per image, summed, or
`ConfusionMeter`), so memory is O(C^2) whatever the dataset size. Conventions follow
mmseg's ``IoUMetric`` (the evaluation code of the training-free OVS papers): pixels whose
ground truth is the ignore index are skipped, classes absent from both ground truth and
prediction get IoU NaN and are left out of the mean.

Predictions may use labels beyond the evaluated classes (an "others" answer, or a distractor
class added at inference, docs/method.md OpenBench): give the matrix ``num_pred_classes`` columns
and `scores_from_confusion` scores only the first ``num_classes`` rows; a pixel
predicted as such an extra label is a false negative of its ground-truth class and a false
positive of no evaluated class.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255,
                     num_pred_classes: int | None = None) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction.

    Args:
        gt: (H, W) int labels; pixels equal to ``ignore_index`` or outside [0, num_classes)
            are skipped.
        pred: (H, W) int predicted labels in [0, num_pred_classes).
        num_classes: C, number of ground-truth classes.
        ignore_index: GT value to skip (any negative value is skipped too).
        num_pred_classes: P >= C columns when predictions may name labels beyond the C
            evaluated classes (rows C..P-1 then stay zero); default C.

    Returns:
        (P, P) int64 matrix (P = C by default).

    Raises:
        ValueError: shapes differ, P < C, or a prediction lies outside [0, P) on a
            counted pixel.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"gt {gt.shape} and pred {pred.shape} differ in shape")
    n = num_classes if num_pred_classes is None else int(num_pred_classes)
    if n < num_classes:
        raise ValueError(f"num_pred_classes ({n}) must be >= num_classes ({num_classes})")
    gt = gt.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    valid = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    if np.any((pred[valid] < 0) | (pred[valid] >= n)):
        raise ValueError(f"predictions outside [0, {n})")
    return np.bincount(gt[valid] * n + pred[valid], minlength=n ** 2).reshape(n, n)


def scores_from_confusion(cm: np.ndarray, num_classes: int | None = None) -> dict:
    """mIoU, per-class IoU, pixel accuracy and mean accuracy from a confusion matrix.

    IoU_c = TP / (TP + FP + FN). Classes absent from both ground truth and prediction get IoU
    NaN and are left out of the mean (mmseg convention).

    Args:
        cm: (P, P) counts, rows = ground truth, columns = prediction.
        num_classes: score only the first C rows/columns (default: all P). Columns >= C
            (predictions outside the evaluated classes) still count as misses of their row's
            class in IoU, accuracy and pixel accuracy.

    Returns:
        dict with ``miou`` (float, %), ``iou`` (list of C, %, NaN for absent classes),
        ``acc`` (list of C per-class recall, %, NaN where the class has no GT pixel),
        ``pixel_acc`` (%), ``mean_acc`` (%), ``num_pixels`` (int).
    """
    cm = np.asarray(cm, np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    c = cm.shape[0] if num_classes is None else int(num_classes)
    if not 0 < c <= cm.shape[0]:
        raise ValueError(f"num_classes must lie in [1, {cm.shape[0]}], got {num_classes}")
    cm = cm[:c]                               # GT rows of the evaluated classes, all columns
    tp = np.diag(cm[:, :c])
    gt_count, pred_count = cm.sum(1), cm[:, :c].sum(0)
    union = gt_count + pred_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_count > 0, tp / gt_count, np.nan)
    total = cm.sum()
    return {
        "miou": float(np.nanmean(iou) * 100) if np.any(~np.isnan(iou)) else float("nan"),
        "iou": (iou * 100).tolist(),
        "acc": (acc * 100).tolist(),
        "pixel_acc": float(tp.sum() / total * 100) if total else float("nan"),
        "mean_acc": float(np.nanmean(acc) * 100) if np.any(~np.isnan(acc)) else float("nan"),
        "num_pixels": int(total),
    }


class ConfusionMeter:
    """Streamed confusion matrix: ``update`` per image, ``scores`` at the end.

    Args:
        num_classes: C evaluated classes.
        num_pred_classes: P >= C prediction labels (extra columns for "others" or
            distractor answers); default C.
        ignore_index: GT value skipped (negative values are skipped too).
    """

    def __init__(self, num_classes: int, num_pred_classes: int | None = None, ignore_index: int = -1):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.num_pred_classes = self.num_classes if num_pred_classes is None else int(num_pred_classes)
        if self.num_pred_classes < self.num_classes:
            raise ValueError(f"num_pred_classes ({num_pred_classes}) < num_classes ({num_classes})")
        self.ignore_index = ignore_index
        self.cm = np.zeros((self.num_pred_classes,) * 2, np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """Add one image; returns its own (P, P) matrix."""
        cm = confusion_matrix(gt, pred, self.num_classes, self.ignore_index, self.num_pred_classes)
        self.cm += cm
        return cm

    def scores(self) -> dict:
        """`scores_from_confusion` over the C evaluated classes."""
        return scores_from_confusion(self.cm, self.num_classes)


def majority_scores(cm: np.ndarray, num_classes: int | None = None) -> tuple[int, dict]:
    """Scores of the trivial predictor that answers the most frequent GT class everywhere.

    Args:
        cm: (P, P) confusion matrix (only its GT row sums are used).
        num_classes: C evaluated classes (default P).

    Returns:
        ``(class index, scores)``; scores as `scores_from_confusion`.
    """
    cm = np.asarray(cm)
    c = cm.shape[0] if num_classes is None else int(num_classes)
    gt_count = cm[:c].sum(1)
    majority = int(gt_count.argmax())
    base = np.zeros((c, c), np.int64)
    base[:, majority] = gt_count
    return majority, scores_from_confusion(base)
