"""OpenBench-style robustness analyses (OVSNet, arXiv 2506.16058; docs/method.md "Related systems").

* `vocabulary_overlap`: how well a reference set's label vocabulary covers a
  benchmark's classes: mean over classes of the max cosine similarity between the class and
  the reference labels, in the reference's own text space (OpenBench reports VOC 0.97,
  PC-59 0.95, ADE-847 0.79, OpenBench 0.61 for its training vocabulary).
* `distractor_sweep`: mIoU over the benchmark's classes when N irrelevant class names
  are added to the query list (0, 10, 50, 150, 500); a pixel won by a distractor counts as a
  miss of its ground-truth class.
* `others_analysis`: open-world check of the "others" answer: some GT classes are
  held out of the query list and their pixels must be answered "others" (confidence below a
  threshold); scored as one extra class.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from reme.eval.datasets import SegDataset
from reme.eval.names import benchmark_classes
from reme.eval.protocol import Protocol, finalize_labels, make_plan, memoized_features
from reme.eval.report import markdown_table, plot_curves, write_json, write_text
from reme.eval.runner import as_segmenter, default_protocol, iter_dataset, predict_classes
from reme.eval.metrics import ConfusionMeter, scores_from_confusion
from reme.encoders.text import embed_labels

logger = logging.getLogger(__name__)

#: Distractor counts of the sweep (issue #4).
DEFAULT_DISTRACTOR_COUNTS = (0, 10, 50, 150, 500)
#: Class-name files pooled as distractor candidates.
DISTRACTOR_SOURCES = ("ade847", "pc459", "coco_stuff171")
#: Candidates whose text embedding is at least this similar to a benchmark class are not
#: "irrelevant" and are left out of the pool. Our choice, from MiniLM cosines with the four
#: templates measured here: car/automobile 0.94, road/street 0.83, pavement/sidewalk 0.75,
#: person/people 0.75 (excluded); car/truck 0.68, tree/vegetation 0.64, car/banana 0.34 (kept).
DEFAULT_EXCLUDE_SIMILARITY = 0.7


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_EMBED_CACHE: dict[tuple, np.ndarray] = {}


def _cached_embeddings(text_encoder, names: Sequence[str], templates) -> np.ndarray:
    """Template-ensembled embeddings of ``names``, memoised per process (the candidate pool is
    the same for every sweep; ~1300 names take tens of seconds on a CPU)."""
    key = (getattr(text_encoder, "spec", id(text_encoder)), tuple(templates), tuple(names))
    if key not in _EMBED_CACHE:
        if len(_EMBED_CACHE) > 8:
            _EMBED_CACHE.clear()
        _EMBED_CACHE[key] = embed_labels(text_encoder, list(names), templates)
    return _EMBED_CACHE[key]


def _class_embeddings(text_encoder, classes: Sequence[Sequence[str]], templates) -> tuple[np.ndarray, np.ndarray]:
    """(S, d) embeddings of every synonym and (S,) owner class index."""
    flat = [s for syns in classes for s in syns]
    owner = np.array([i for i, syns in enumerate(classes) for _ in syns], np.int64)
    return _cached_embeddings(text_encoder, flat, tuple(templates)), owner


def vocabulary_overlap(model, classes: Sequence[Sequence[str]], *, device=None) -> dict:
    """Semantic overlap between a reference set's labels and a class list (OpenBench).

    For each class, the max cosine similarity between any of its synonyms and any reference
    label (L_ref), both embedded with the reference's text encoder and prompt templates;
    the score is the mean over classes.

    Args:
        model: [`reme.Segmenter`][reme.Segmenter] or reference path (its text encoder and L_ref are
            used).
        classes: C synonym lists.

    Returns:
        ``{"mean": float in [-1, 1], "per_class": {name: (similarity, nearest label)}}``.
    """
    seg = model if hasattr(model, "text_encoder") and hasattr(model, "reference") else as_segmenter(model, device=device)
    L_ref = np.asarray(seg.reference.L_ref, np.float32)
    if L_ref.shape[0] == 0:
        raise ValueError("the reference set has no labels")
    E, owner = _class_embeddings(seg.text_encoder, classes, seg.templates)
    sim = E @ L_ref.T                                        # (S, n)
    best_label = sim.argmax(1)
    best = sim.max(1)
    per_class = {}
    for ci, syns in enumerate(classes):
        rows = np.flatnonzero(owner == ci)
        r = rows[best[rows].argmax()]
        per_class[syns[0]] = (float(best[r]), seg.reference.labels[int(best_label[r])])
    return {"mean": float(np.mean([v[0] for v in per_class.values()])), "per_class": per_class,
            "num_reference_labels": int(L_ref.shape[0])}


def distractor_candidates(sources: Sequence[str] = DISTRACTOR_SOURCES) -> list[list[str]]:
    """Synonym lists of the shipped class files ``sources``, deduplicated by display name."""
    cands: dict[str, list[str]] = {}
    for src in sources:
        for syns in benchmark_classes(src):
            key = _norm(syns[0])
            if key and key not in cands:
                cands[key] = syns
    return list(cands.values())


def distractor_pool(classes: Sequence[Sequence[str]], text_encoder, *, templates=None,
                    sources: Sequence[str] = DISTRACTOR_SOURCES, candidates: Sequence[Sequence[str]] | None = None,
                    exclude_similarity: float = DEFAULT_EXCLUDE_SIMILARITY, seed: int = 0,
                    max_count: int | None = None, chunk: int = 128) -> list[str]:
    """Irrelevant class names for a benchmark, in a fixed random order.

    Candidates are the shipped class files ``sources`` (or the given ``candidates`` synonym
    lists), deduplicated by display name and shuffled with ``seed``. A candidate is dropped
    when any of its names equals (ignoring case and punctuation) any synonym of a benchmark
    class, or when the text embedding of its display name has cosine >= ``exclude_similarity``
    with any benchmark synonym. The order does not depend on ``max_count``, so the first N
    names for a smaller N are a subset of those for a larger N.

    Args:
        classes: the benchmark's synonym lists.
        text_encoder: encoder of the similarity test (the reference set's).
        templates: prompt templates (default: the paper's four).
        max_count: stop once this many are found (candidates are embedded ``chunk`` at a
            time, so a short sweep does not embed all ~1300); None = the whole pool.

    Returns:
        Distractor names (display names only, no synonyms).
    """
    from reme.encoders.text import TEMPLATES

    templates = tuple(templates or TEMPLATES)
    taken = {_norm(s) for syns in classes for s in syns}
    pool_src = distractor_candidates(sources) if candidates is None else [list(c) for c in candidates]
    names = [c[0] for c in pool_src if not any(_norm(s) in taken for s in c)]
    random.Random(seed).shuffle(names)
    E_b, _ = _class_embeddings(text_encoder, classes, templates)
    pool: list[str] = []
    for start in range(0, len(names), chunk):
        if max_count is not None and len(pool) >= max_count:
            break
        part = names[start:start + chunk]
        sim = _cached_embeddings(text_encoder, part, templates) @ E_b.T
        pool.extend(n for n, s in zip(part, sim.max(1)) if s < exclude_similarity)
    logger.info("distractor pool: %d names kept of %d checked (cosine < %.2f)", len(pool),
                min(len(names), start + chunk) if names else 0, exclude_similarity)
    return pool


def distractor_sweep(model, dataset: SegDataset, counts: Sequence[int] = DEFAULT_DISTRACTOR_COUNTS,
                     protocol: Protocol | None = None, *, pool: Sequence[str] | None = None, seed: int = 0,
                     out_dir: str | Path | None = None, progress: bool = True, device=None) -> dict:
    """mIoU and pixel accuracy against the number of distractor classes.

    Every image is segmented once per count with the dataset's classes followed by the first
    N names of `distractor_pool` (dense features are computed once per image). Counts
    larger than the pool are capped (reported as ``num_distractors``); ``pool_head`` lists the
    first 20 names.

    Args:
        model: Segmenter or reference path.
        dataset: the data.
        counts: distractor counts.
        protocol: protocol (default: the dataset's).
        pool: distractor names (default: `distractor_pool` with ``seed``).
        out_dir: writes ``distractors.json``, ``distractors.md``, ``distractors.png``.

    Returns:
        ``{"counts", "num_distractors", "miou", "pixel_acc", "distractor_fraction", "pool_head", ...}``
        (lists aligned with ``counts``; ``distractor_fraction`` = share of scored pixels won
        by a distractor).
    """
    seg = as_segmenter(model, device=device)
    protocol = protocol or default_protocol(dataset)
    if pool is None:
        pool = distractor_pool(dataset.classes, seg.text_encoder, templates=seg.templates, seed=seed,
                               max_count=max(counts, default=0))
    ns = [min(int(n), len(pool)) for n in counts]
    plans = [make_plan(dataset.classes, dataset.background_index, protocol, extra_queries=list(pool[:n])) for n in ns]
    meters = [ConfusionMeter(dataset.num_classes, dataset.num_classes + 1) for _ in ns]
    num = 0
    with memoized_features(seg):
        for _, _, img, gt in iter_dataset(dataset, progress=progress, desc="distractor sweep"):
            num += 1
            for plan, meter in zip(plans, meters):
                label_q, conf = predict_classes(seg, img, plan, protocol, gt.shape)
                meter.update(gt, finalize_labels(label_q, conf, plan))
    C = dataset.num_classes
    scores = [scores_from_confusion(m.cm, C) for m in meters]
    out = {
        "dataset": dataset.name, "num_images": num, "counts": list(counts), "num_distractors": ns,
        "miou": [s["miou"] for s in scores], "pixel_acc": [s["pixel_acc"] for s in scores],
        "distractor_fraction": [float(m.cm[:C, C].sum() / max(m.cm[:C].sum(), 1)) for m in meters],
        "pool_head": list(pool[:20]), "protocol": protocol.to_dict(),
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out, out_dir / "distractors.json")
        rows = [{"n": n, "m": m, "p": p, "f": 100 * f} for n, m, p, f in
                zip(ns, out["miou"], out["pixel_acc"], out["distractor_fraction"])]
        write_text(markdown_table(rows, ["n", "m", "p", "f"],
                                  ["distractors", "mIoU", "pixel acc.", "pixels won by distractors %"]),
                   out_dir / "distractors.md")
        plot_curves(ns, {"mIoU": out["miou"]}, out_dir / "distractors.png", xlabel="distractor classes added",
                    ylabel="mIoU (%)", title=f"{dataset.name}: distractor sweep ({num} images)", logx=True)
    return out


def others_analysis(model, dataset: SegDataset, held_out: Sequence[str], thresholds: Sequence[float],
                    protocol: Protocol | None = None, *, progress: bool = True, device=None) -> list[dict]:
    """Open-world "others" check: held-out classes must be answered "others".

    The held-out classes are removed from the query list; their GT pixels become the class
    "others" (index C'); a pixel whose confidence is below the threshold is answered
    "others". mIoU is over the C' listed classes plus "others".

    Args:
        model: Segmenter or reference path.
        dataset: the data (without a background threshold: ``background`` must not hide the
            effect, so the background class, if any, stays an ordinary queried class).
        held_out: display names of the classes to hold out.
        thresholds: "others" thresholds to score (0 = never "others").

    Returns:
        One dict per threshold: ``threshold``, ``miou`` (listed + others),
        ``miou_listed``, ``others_iou``, ``pixel_acc``, ``others_fraction`` (share of
        pixels answered "others").

    Raises:
        ValueError: a held-out name is not a class, or nothing would be left.
    """
    seg = as_segmenter(model, device=device)
    protocol = replace(protocol or default_protocol(dataset), background="class", others_threshold=0.0)
    names = dataset.names
    missing = [h for h in held_out if h not in names]
    if missing:
        raise ValueError(f"held-out classes not in {dataset.name}: {missing}")
    listed = [i for i, n in enumerate(names) if n not in set(held_out)]
    if not listed:
        raise ValueError("every class is held out")
    remap = np.full(len(names), len(listed), np.int64)                  # held out -> "others"
    remap[listed] = np.arange(len(listed))
    sub_classes = [dataset.classes[i] for i in listed]
    plan = make_plan(sub_classes, None, protocol)
    Cp = len(listed) + 1
    meters = [ConfusionMeter(Cp) for _ in thresholds]
    for _, _, img, gt in iter_dataset(dataset, progress=progress, desc="others analysis"):
        label_q, conf = predict_classes(seg, img, plan, protocol, gt.shape)
        gt2 = np.where(gt >= 0, remap[np.clip(gt, 0, None)], -1)
        for t, meter in zip(thresholds, meters):
            meter.update(gt2, finalize_labels(label_q, conf, plan, others_threshold=t))
    out = []
    for t, m in zip(thresholds, meters):
        s = scores_from_confusion(m.cm)
        listed_iou = np.array(s["iou"][:-1], np.float64)
        out.append({"threshold": float(t), "miou": s["miou"],
                    "miou_listed": float(np.nanmean(listed_iou)) if np.any(~np.isnan(listed_iou)) else float("nan"),
                    "others_iou": s["iou"][-1], "pixel_acc": s["pixel_acc"],
                    "others_fraction": float(m.cm[:, -1].sum() / max(m.cm.sum(), 1))})
    return out


__all__ = ["distractor_candidates", "distractor_pool", "distractor_sweep", "others_analysis", "vocabulary_overlap"]
