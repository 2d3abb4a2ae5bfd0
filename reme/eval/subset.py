"""Subset-query evaluation: ask only some of a benchmark's classes (docs/results.md, "None of
these").

A user's class list rarely covers every pixel. This protocol asks a subset A of a benchmark's C
classes and scores the answer with "none of these" allowed (label -1):

* **forced share**: of the pixels whose true class is not in A (ignore pixels skipped), the
  share labelled as some asked class. 0 is ideal; the paper's eqs. 1-3 give 100 %.
* **asked IoU**: per asked class a, IoU_a = TP / (TP + FP + FN) over all counted pixels, where an
  unlabelled pixel is never a; the asked mIoU is their mean (NaN classes, absent from both
  ground truth and prediction, left out as in `reme.eval.metrics`).

Memory is O(C |A|) whatever the number of images (`SubsetMeter`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class SubsetMeter:
    """Streamed (C, |A| + 1) confusion of ground truth against subset answers.

    Args:
        asked: benchmark class ids of the asked classes, in the order the predictions index
            them (prediction j means class ``asked[j]``).
        num_classes: C benchmark classes; ground truth outside [0, C) or equal to
            ``ignore_index`` is skipped.
        ignore_index: ground-truth value to skip.

    Raises:
        ValueError: an asked id outside [0, C), or repeated.
    """

    def __init__(self, asked: Sequence[int], num_classes: int, ignore_index: int = 255):
        self.asked = [int(a) for a in asked]
        self.num_classes = int(num_classes)
        if len(set(self.asked)) != len(self.asked) or any(not 0 <= a < self.num_classes for a in self.asked):
            raise ValueError(f"asked ids must be distinct and in [0, {self.num_classes}), got {self.asked}")
        self.ignore_index = ignore_index
        self.cm = np.zeros((self.num_classes, len(self.asked) + 1), np.int64)  # last column: unlabelled

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image: ``gt`` (H, W) benchmark ids, ``pred`` (H, W) indices into ``asked``
        or negative (unlabelled).

        Raises:
            ValueError: shapes differ, or a prediction >= len(asked).
        """
        if gt.shape != pred.shape:
            raise ValueError(f"gt {gt.shape} and pred {pred.shape} differ in shape")
        a = len(self.asked)
        g = gt.astype(np.int64).ravel()
        p = pred.astype(np.int64).ravel()
        valid = (g != self.ignore_index) & (g >= 0) & (g < self.num_classes)
        g, p = g[valid], p[valid]
        if np.any(p >= a):
            raise ValueError(f"predictions must index the {a} asked classes or be < 0")
        p = np.where(p < 0, a, p)
        self.cm += np.bincount(g * (a + 1) + p, minlength=self.num_classes * (a + 1)).reshape(self.num_classes, a + 1)

    def scores(self) -> dict:
        """``forced_share`` (%), ``asked_iou`` (list, %, NaN for absent classes), ``asked_miou``
        (%), ``unlabelled_share`` (% of all counted pixels left unlabelled), ``not_asked_pixels``,
        ``num_pixels``."""
        return subset_scores(self.cm, self.asked)


def subset_scores(cm: np.ndarray, asked: Sequence[int]) -> dict:
    """Scores of a (C, |A| + 1) subset confusion matrix (`SubsetMeter`); see the module doc."""
    cm = np.asarray(cm, np.float64)
    a = len(asked)
    rows = np.asarray(asked, np.int64)
    tp = cm[rows, np.arange(a)]
    fp = cm[:, :a].sum(0) - tp
    fn = cm[rows].sum(1) - tp
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    other = np.ones(cm.shape[0], bool)
    other[rows] = False
    not_asked = cm[other].sum()
    total = cm.sum()
    return {
        "forced_share": float(cm[other, :a].sum() / not_asked * 100) if not_asked else float("nan"),
        "asked_iou": (iou * 100).tolist(),
        "asked_miou": float(np.nanmean(iou) * 100) if np.any(~np.isnan(iou)) else float("nan"),
        "unlabelled_share": float(cm[:, a].sum() / total * 100) if total else float("nan"),
        "not_asked_pixels": int(not_asked),
        "num_pixels": int(total),
    }


def parse_asked(text: str, names: Sequence[str]) -> list[int]:
    """Comma-separated class names of a benchmark (its display names) -> their ids.

    Raises:
        ValueError: an unknown or repeated name, or none given.
    """
    lower = {n.lower(): i for i, n in enumerate(names)}
    asked = [x.strip() for x in text.split(",") if x.strip()]
    if not asked:
        raise ValueError("--ask: give at least one class name")
    bad = [x for x in asked if x.lower() not in lower]
    if bad:
        raise ValueError(f"--ask: {', '.join(bad)} not among the dataset's classes ({', '.join(names)})")
    ids = [lower[x.lower()] for x in asked]
    if len(set(ids)) != len(ids):
        raise ValueError("--ask: a class is named twice")
    return ids


def run_subset_eval(segmenter, dataset, asked: Sequence[int], *, progress: bool = False) -> dict:
    """The subset-query protocol on a dataset: ask ``asked`` (benchmark class ids) image by
    image with `Segmenter.predict` ("none of these" as configured on ``segmenter``) and with
    every pixel assigned (the paper's eqs. 1-3, same scales and top-k; the encoder runs once,
    the second answer reuses the cached view).

    Args:
        segmenter: a [`reme.Segmenter`][reme.inference.segmenter.Segmenter].
        dataset: a `reme.eval.datasets.SegDataset` (masks -1 = ignore).
        asked: class ids to ask, queried with the dataset's synonyms of each class.
        progress: log one line per 10 images.

    Returns:
        ``{"asked": names, "images": N, "unlabelled": scores, "paper": scores}`` with
        `SubsetMeter.scores` dicts.
    """
    import copy
    import logging

    from reme.inference.unlabelled import OFF

    log = logging.getLogger(__name__)
    paper = copy.copy(segmenter)
    paper.none_rule = OFF
    query = [dataset.classes[i] for i in asked]
    meters = {"unlabelled": SubsetMeter(asked, dataset.num_classes, -1), "paper": SubsetMeter(asked, dataset.num_classes, -1)}
    for n, sample in enumerate(dataset):
        image, gt = dataset.load_image(sample), dataset.load_mask(sample)
        for key, seg in (("unlabelled", segmenter), ("paper", paper)):
            meters[key].update(gt, seg.predict(image, query).label_map)
        if progress and (n + 1) % 10 == 0:
            log.info("subset protocol: %d / %d images", n + 1, len(dataset))
    return {"asked": [dataset.names[i] for i in asked], "images": len(dataset),
            **{k: m.scores() for k, m in meters.items()}}


def subset_markdown(result: dict, name: str) -> str:
    """The `run_subset_eval` result as a Markdown table."""
    lines = [f"{name}, asked: {', '.join(result['asked'])} ({result['images']} images)", "",
             "| answer | asked mIoU | forced share % | unlabelled % | " + " | ".join(result["asked"]) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in result["asked"]) + " |"]
    for key, label in (("unlabelled", "none of these"), ("paper", "every pixel assigned")):
        r = result[key]
        lines.append(f"| {label} | {r['asked_miou']:.2f} | {r['forced_share']:.1f} | {r['unlabelled_share']:.1f} | "
                     + " | ".join(f"{v:.2f}" for v in r["asked_iou"]) + " |")
    return "\n".join(lines)
