"""Evaluation of reme the way the field measures training-free OVS (``reme eval``).

* `reme.eval.datasets`: readers for the ten benchmarks of docs/method.md in their usual
  on-disk layouts and a generic images + masks + ``classes.txt`` reader.
* `reme.eval.protocol`: short-side resize, whole-image or sliding-window inference,
  background threshold, synonym max, "others" threshold.
* `reme.eval.runner`: `evaluate` (streamed confusion matrix -> mIoU, per-class IoU,
  pixel accuracy, mean accuracy; JSON, Markdown, confusion-matrix PNG, side-by-side PNGs).
* `reme.eval.openbench`: vocabulary overlap, distractor sweep, "others" analysis
  (OVSNet / OpenBench lessons in docs/method.md).
* `reme.eval.ablation`: reference-set variants with build stages switched on/off.

Example::

    from reme.eval import open_dataset, evaluate
    ds = open_dataset("coco_object", root="../shared/data/coco_tiny")
    res = evaluate("refs/coco_gt", ds, out_dir="eval_out")
    res.miou, res.pixel_acc
"""

from __future__ import annotations

from pathlib import Path

from reme.eval.datasets import BENCHMARKS, BenchmarkSpec, Layout, Sample, SegDataset, load_benchmark, load_generic
from reme.eval.names import benchmark_classes, class_queries, read_class_file
from reme.eval.protocol import Protocol, benchmark_protocol
from reme.eval.runner import EvalResult, evaluate, sweep_thresholds


def open_dataset(name: str, root: str | Path | None = None, *, split: str | None = None,
                 images: str | Path | None = None, masks: str | Path | None = None,
                 classes_file: str | Path | None = None, ignore_index: int | None = None,
                 reduce_zero_label: bool | None = None, background: str | None = None,
                 limit: int | None = None, stride: int = 1, offset: int = 0,
                 layout: str | None = None) -> SegDataset:
    """A benchmark (``name`` in `BENCHMARKS`) or ``"generic"`` dataset.

    Args:
        name: benchmark key or ``"generic"``.
        root: benchmark root (see ``docs/evaluation.md`` for the trees).
        split: benchmark split (default ``val`` / ``validation``).
        images, masks: explicit folders (required for ``generic``; override a benchmark's
            layout otherwise).
        classes_file: class-name file (required for ``generic``).
        ignore_index: mask value to ignore (generic default 255; benchmarks: their own).
        reduce_zero_label: generic only: ignore value 0 and shift labels down.
        background: generic only: display name of the background class (threshold protocol).
        limit: keep the first ``limit`` samples (after ``offset`` and ``stride``).
        stride: keep every ``stride``-th sample.
        offset: skip the first ``offset`` samples (sorted by key).
        layout: benchmarks only: ``"mmseg"``, ``"detectron2"`` or ``"flat"`` tree
            (`reme.eval.datasets.load_benchmark`); None = detect.

    Raises:
        ValueError: bad arguments. FileNotFoundError: data not found.
    """
    if name == "generic":
        if layout is not None:
            raise ValueError("--layout applies to the benchmarks, not to the generic dataset")
        if images is None or masks is None or classes_file is None:
            raise ValueError("the generic dataset needs images, masks and classes_file")
        ds = load_generic(images, masks, classes_file, ignore_index=255 if ignore_index is None else ignore_index,
                          reduce_zero_label=bool(reduce_zero_label), background=background)
    else:
        if background is not None or reduce_zero_label is not None:
            raise ValueError(f"background and reduce_zero_label are fixed by the {name} benchmark; "
                             "use the generic dataset to change them")
        ds = load_benchmark(name, root, split=split, images=images, masks=masks, classes_file=classes_file,
                            layout=layout)
        if ignore_index is not None:
            ds.ignore_index = ignore_index
    return ds.subset(limit, stride, offset) if (limit is not None or stride != 1 or offset) else ds


__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "EvalResult",
    "Layout",
    "Protocol",
    "Sample",
    "SegDataset",
    "benchmark_classes",
    "benchmark_protocol",
    "class_queries",
    "evaluate",
    "load_benchmark",
    "load_generic",
    "open_dataset",
    "read_class_file",
    "sweep_thresholds",
]
