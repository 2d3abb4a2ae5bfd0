"""``evaluate``: a reference set (through [`reme.Segmenter`][reme.Segmenter]) on a labelled dataset
under the benchmark protocol, with a streamed confusion matrix and the report files."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from reme.errors import ImageReadError
from reme.eval.datasets import SegDataset
from reme.eval.protocol import (
    Protocol,
    QueryPlan,
    benchmark_protocol,
    finalize_labels,
    make_plan,
    predict_image,
)
from reme.inference.maps import upsample_nearest
from reme.eval.report import result_markdown, save_confusion_png, save_side_by_side, write_json, write_text
from reme.eval.metrics import ConfusionMeter, majority_scores, scores_from_confusion

logger = logging.getLogger(__name__)


def as_segmenter(model, device=None, **kwargs):
    """A [`reme.Segmenter`][reme.Segmenter] from a Segmenter (or any object with its
    ``segment_scores`` method, returned as is), a loaded [`reme.ReferenceSet`][reme.ReferenceSet] or
    a reference folder path; ``kwargs`` go to the constructor."""
    from reme.inference.segmenter import Segmenter

    if isinstance(model, Segmenter) or hasattr(model, "segment_scores"):
        return model
    return Segmenter(model, device=device, **kwargs)


def default_protocol(dataset: SegDataset, **overrides) -> Protocol:
    """The benchmark's default protocol (generic datasets: native size, whole image)."""
    return benchmark_protocol(dataset.spec, **overrides)


def reference_info(segmenter, path=None) -> dict:
    """Provenance of the segmenter's reference set and retrieval settings (for reports);
    ``path`` is the reference folder when known."""
    ref = getattr(segmenter, "reference", None)
    man = (getattr(ref, "manifest", None) or {}) if ref is not None else {}
    return {
        "path": str(path) if path is not None else None,
        "mode": man.get("mode"),
        "encoders": man.get("encoders"),
        "num_segments": getattr(ref, "num_segments", None),
        "num_labels": getattr(ref, "num_labels", None),
        "top_k": getattr(segmenter, "top_k", None),
        "segment_logit_scale": getattr(segmenter, "segment_logit_scale", None),
        "label_logit_scale": getattr(segmenter, "label_logit_scale", None),
        "retrieval": getattr(segmenter, "retrieval", None),
        "proposals": getattr(segmenter, "proposals", None),
        "smooth_omega": getattr(segmenter, "smooth_omega", None),
        "overlay": _overlay_info(getattr(segmenter, "overlay", None)),
        "example_bias": getattr(segmenter, "example_bias", None),
    }


def _overlay_info(overlay) -> dict | None:
    """Path, rows, examples and labels of a non-empty overlay (reme.reference.overlay), else None."""
    if overlay is None or not len(overlay):
        return None
    return {"path": str(overlay.path) if overlay.path is not None else None, "rows": overlay.num_rows,
            "examples": len(overlay.examples()), "labels": sorted(set(overlay.labels))}


def iter_dataset(dataset: SegDataset, *, progress: bool = True, desc: str = "eval",
                 skipped: list | None = None) -> Iterator[tuple[int, object, np.ndarray, np.ndarray]]:
    """``(index, sample, image (H, W, 3) uint8, gt (H, W) int64)`` per readable sample.

    Unreadable images, missing masks and masks whose size differs from their image are
    skipped with a warning and appended to ``skipped`` as ``{"key", "reason"}``.
    """
    for i, sample in enumerate(tqdm(dataset.samples, desc=desc, unit="img", disable=not progress)):
        try:
            img = dataset.load_image(sample)
            gt = dataset.load_mask(sample)
            if gt.shape != img.shape[:2]:
                raise ValueError(f"mask {sample.mask} is {gt.shape}, image is {img.shape[:2]}")
        except (ImageReadError, FileNotFoundError, ValueError) as exc:
            logger.warning("skipping %s: %s", sample.key, exc)
            if skipped is not None:
                skipped.append({"key": sample.key, "reason": str(exc)})
            continue
        yield i, sample, img, gt


def predict_classes(segmenter, image: np.ndarray, plan: QueryPlan, protocol: Protocol,
                    shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Query labels and confidences of one image brought to ``shape`` (default: the image's).

    Returns:
        ``(label_q, conf)``: (H, W) int32 query indices and float32 confidences.
    """
    label_q, conf = predict_image(segmenter, image, plan.queries, protocol)
    shape = shape or image.shape[:2]
    return upsample_nearest(label_q, shape), upsample_nearest(conf, shape)


@dataclass
class EvalResult:
    """Scores of one evaluation.

    Attributes:
        dataset: dataset name; classes: C display names.
        confusion: (P, P) int64 streamed confusion matrix (P = C, or C + 1 with an
            "others"/distractor answer column).
        scores: `reme.eval.metrics.scores_from_confusion` over the C classes.
        num_images: images scored; skipped: ``{"key", "reason"}`` of the others.
        seconds: wall time of the loop.
        protocol: the `Protocol` used; reference: `reference_info`.
        background_class: name of the class set by the threshold, or None.
        extra: free-form additions (e.g. the dataset layout).
    """

    dataset: str
    classes: list[str]
    confusion: np.ndarray
    scores: dict
    num_images: int
    skipped: list
    seconds: float
    protocol: Protocol
    reference: dict
    background_class: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def miou(self) -> float:
        return self.scores["miou"]

    @property
    def pixel_acc(self) -> float:
        return self.scores["pixel_acc"]

    def to_dict(self, with_confusion: bool = True) -> dict:
        """JSON-ready dict (percentages; per-class values keyed by class name)."""
        C = len(self.classes)
        cm = self.confusion
        gt = cm[:C].sum(1)
        total = max(int(gt.sum()), 1)
        maj, maj_scores = majority_scores(cm, C)
        unmatched = int(cm[:C, C:].sum()) if cm.shape[1] > C else 0
        out = {
            "dataset": self.dataset,
            "num_images": self.num_images,
            "skipped": self.skipped,
            "miou": self.scores["miou"],
            "pixel_acc": self.scores["pixel_acc"],
            "mean_acc": self.scores["mean_acc"],
            "num_pixels": self.scores["num_pixels"],
            "classes": self.classes,
            "iou": dict(zip(self.classes, self.scores["iou"])),
            "acc": dict(zip(self.classes, self.scores["acc"])),
            "gt_fraction": dict(zip(self.classes, (gt / total).tolist())),
            "unmatched_fraction": unmatched / total,
            "majority": {"class": self.classes[maj], "miou": maj_scores["miou"], "pixel_acc": maj_scores["pixel_acc"]},
            "background_class": self.background_class,
            "seconds": round(self.seconds, 2),
            "seconds_per_image": round(self.seconds / max(self.num_images, 1), 3),
            "protocol": self.protocol.to_dict(),
            "reference": self.reference,
            **self.extra,
        }
        if with_confusion:
            out["confusion"] = cm.tolist()
        return out


def evaluate(model, dataset: SegDataset, protocol: Protocol | None = None, *, out_dir: str | Path | None = None,
             num_vis: int = 4, progress: bool = True, device=None, segmenter_kwargs: dict | None = None,
             reference_path: str | Path | None = None) -> EvalResult:
    """mIoU, per-class IoU, pixel and mean accuracy of a reference set on a dataset.

    Args:
        model: [`reme.Segmenter`][reme.Segmenter], a loaded ReferenceSet or a reference folder path.
        dataset: a `SegDataset` (``reme.eval.open_dataset``).
        protocol: the `Protocol`; default `default_protocol` of the dataset.
        out_dir: when given, writes ``results.json``, ``results.md``, ``confusion.png`` and
            ``vis/<n>_<key>.png`` (image | ground truth | prediction) for the first
            ``num_vis`` images.
        num_vis: number of side-by-side PNGs.
        progress: tqdm progress bar.
        device: device for a Segmenter built here.
        segmenter_kwargs: constructor arguments for a Segmenter built here (``top_k``, ...).
        reference_path: reference folder recorded in the report when ``model`` is a
            Segmenter (default: ``model`` itself when it is a path).

    Returns:
        `EvalResult`.
    """
    seg = as_segmenter(model, device=device, **(segmenter_kwargs or {}))
    protocol = protocol or default_protocol(dataset)
    plan = make_plan(dataset.classes, dataset.background_index, protocol)
    meter = ConfusionMeter(dataset.num_classes, plan.num_pred_classes)
    out_dir = Path(out_dir) if out_dir else None
    skipped: list = []
    n = 0
    t0 = time.perf_counter()
    for i, sample, img, gt in iter_dataset(dataset, progress=progress, desc=f"eval {dataset.name}", skipped=skipped):
        label_q, conf = predict_classes(seg, img, plan, protocol, gt.shape)
        pred = finalize_labels(label_q, conf, plan)
        meter.update(gt, pred)
        n += 1
        if out_dir is not None and n <= num_vis:
            safe = sample.key.replace("/", "_")
            save_side_by_side(img, gt, pred, dataset.names, out_dir / "vis" / f"{n:03d}_{safe}.png", title=sample.key)
    seconds = time.perf_counter() - t0
    info = reference_info(seg, reference_path or (model if isinstance(model, (str, Path)) else None))
    bg = dataset.names[plan.background_index] if plan.background_index is not None else None
    result = EvalResult(dataset=dataset.name, classes=dataset.names, confusion=meter.cm, scores=meter.scores(),
                        num_images=n, skipped=skipped, seconds=seconds, protocol=protocol, reference=info,
                        background_class=bg, extra={"dataset_meta": dataset.meta,
                                                    "dataset_root": str(dataset.root) if dataset.root else None})
    if out_dir is not None:
        write_outputs(result, out_dir)
    logger.info("%s: mIoU %.2f, pixel accuracy %.2f on %d images (%.1f s)", dataset.name, result.miou,
                result.pixel_acc, n, seconds)
    return result


def write_outputs(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``confusion.png`` of a result; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = result.to_dict()
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "confusion": out_dir / "confusion.png"}
    write_json(d, paths["json"])
    write_text(result_markdown(d), paths["markdown"])
    save_confusion_png(result.confusion, result.classes, paths["confusion"],
                       title=f"{result.dataset}: mIoU {result.miou:.2f}")
    return paths


def sweep_thresholds(model, dataset: SegDataset, thresholds: Sequence[float], protocol: Protocol | None = None, *,
                     kind: str = "background", progress: bool = True, device=None) -> list[dict]:
    """Scores for several background (or "others") thresholds from one inference pass.

    Args:
        model: Segmenter or reference (see `evaluate`).
        dataset: the data (needs a background class for ``kind="background"``).
        thresholds: confidence thresholds in [0, 1].
        protocol: base protocol (its own threshold is ignored; background mode ``"class"``
            becomes ``"class+threshold"``).
        kind: ``"background"`` or ``"others"``.

    Returns:
        One dict per threshold: ``threshold``, ``miou``, ``pixel_acc``, ``mean_acc``,
        ``set_fraction`` (fraction of scored pixels the threshold re-labelled).

    Raises:
        ValueError: unknown kind, or background sweep on a dataset without background.
    """
    from dataclasses import replace

    if kind not in ("background", "others"):
        raise ValueError(f"kind must be 'background' or 'others', got {kind!r}")
    seg = as_segmenter(model, device=device)
    protocol = protocol or default_protocol(dataset)
    if kind == "background":
        if dataset.background_index is None:
            raise ValueError(f"{dataset.name} has no background class")
        mode = "threshold" if protocol.background == "threshold" else "class+threshold"
        protocol = replace(protocol, background=mode, others_threshold=None)
    else:
        protocol = replace(protocol, others_threshold=0.0)
    plan = make_plan(dataset.classes, dataset.background_index, protocol)
    meters = [ConfusionMeter(dataset.num_classes, plan.num_pred_classes) for _ in thresholds]
    changed = np.zeros(len(thresholds))
    total = 0
    for _, _, img, gt in iter_dataset(dataset, progress=progress, desc=f"{kind} sweep"):
        label_q, conf = predict_classes(seg, img, plan, protocol, gt.shape)
        valid = gt >= 0
        total += int(valid.sum())
        for k, t in enumerate(thresholds):
            if kind == "background":
                pred = finalize_labels(label_q, conf, plan, bg_threshold=t)
            else:
                pred = finalize_labels(label_q, conf, plan, others_threshold=t)
            meters[k].update(gt, pred)
            changed[k] += int(((conf < t) & valid).sum())
    out = []
    for k, t in enumerate(thresholds):
        s = scores_from_confusion(meters[k].cm, dataset.num_classes)
        out.append({"threshold": float(t), "miou": s["miou"], "pixel_acc": s["pixel_acc"], "mean_acc": s["mean_acc"],
                    "set_fraction": changed[k] / max(total, 1)})
    return out
