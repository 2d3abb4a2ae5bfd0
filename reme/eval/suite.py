"""``reme eval --suite paper``: every benchmark of the paper found under one datasets root,
evaluated one after the other (resumable per benchmark) and summarised like the paper's
Table 1 beside the published numbers of its peers.

The datasets root is the folder ReME's, CAT-Seg's and ProxyCLIP's preparation scripts write
(``$DETECTRON2_DATASETS``, default ``./datasets``): ``VOCdevkit/VOC2012``, ``VOCdevkit/VOC2010``,
``coco_stuff164k`` (with ``coco_object``), ``ADEChallengeData2016``, ``ADE20K_2021_17_01``,
``cityscapes`` (`reme.eval.datasets.BenchmarkSpec.homes`). Each benchmark is read in whichever
of its layouts is there (`reme.eval.datasets.load_benchmark`).

Per benchmark the results go to ``<out>/<benchmark>/`` (``results.json`` with a ``suite_key``
fingerprint of the reference, protocol, segmenter options and image list); a benchmark whose
``results.json`` carries the same fingerprint is read back instead of recomputed, so an
interrupted run resumes where it stopped. ``<out>/summary.json`` and ``<out>/summary.md`` hold
the table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from reme.eval.datasets import BENCHMARKS, SegDataset, load_benchmark
from reme.eval.protocol import Protocol, benchmark_protocol
from reme.eval.report import write_json, write_text

logger = logging.getLogger(__name__)

#: The ten benchmarks of the paper in the column order of its Table 1: the three with a
#: background class, then the seven without.
PAPER_BENCHMARKS = ("voc21", "pc60", "coco_object", "voc20", "pc59", "coco_stuff171", "cityscapes", "ade150",
                    "ade847", "pc459")
#: Benchmarks whose ground truth has a background class.
WITH_BACKGROUND = ("voc21", "pc60", "coco_object")
#: Column titles of the summary table.
COLUMN_TITLES = {"voc21": "VOC21", "pc60": "PC60", "coco_object": "Object", "voc20": "VOC20", "pc59": "PC59",
                 "coco_stuff171": "Stuff", "cityscapes": "City", "ade150": "ADE", "ade847": "ADE847",
                 "pc459": "PC459"}
#: The two averages of the table: ``avg8`` over the eight benchmarks SCLIP, ProxyCLIP, Trident and
#: CorrCLIP average over (the three with background and the five without, ADE-847 and PC-459
#: left out), ``avg10`` over all ten (CorrCLIPv2's average).
AVERAGES = {"avg8": PAPER_BENCHMARKS[:8], "avg10": PAPER_BENCHMARKS}


@dataclass(frozen=True)
class Peer:
    """A published result shown beside reme's: mIoU per benchmark and/or averages (percent).

    Attributes:
        name: method (and model size) as published.
        miou: benchmark key -> published mIoU.
        averages: ``avg8`` / ``avg10`` -> published average (missing keys are computed from
            ``miou`` when it covers the benchmarks, and marked so).
        source: where the numbers are published.
    """

    name: str
    miou: dict
    averages: dict
    source: str


#: Published numbers (mIoU, %). CorrCLIPv2-L: COCO memory bank, MetaCLIP ViT-L/14 table of
#: the README of github.com/zdk258/CorrCLIP (``CorrCLIPv2/README.md``, commit 103bc18); the others
#: are the papers' averages over the eight benchmarks of ``AVERAGES["avg8"]``.
PEERS = (
    Peer("CorrCLIPv2-L (COCO bank)",
         {"voc21": 82.3, "voc20": 93.2, "pc60": 51.1, "pc59": 56.8, "coco_object": 58.0, "coco_stuff171": 39.1,
          "ade150": 36.5, "cityscapes": 59.2, "ade847": 14.9, "pc459": 18.6}, {"avg10": 51.0},
         "github.com/zdk258/CorrCLIP, CorrCLIPv2/README.md (MetaCLIP ViT-L/14, COCO bank)"),
    Peer("CorrCLIP-L", {}, {"avg8": 55.4}, "CorrCLIP (Zhang et al., ICCV 2025), 8-benchmark average"),
    Peer("Trident", {}, {"avg8": 48.6}, "Trident (Shi et al., 2024), 8-benchmark average"),
    Peer("ProxyCLIP", {}, {"avg8": 44.4}, "ProxyCLIP (Lan et al., ECCV 2024), 8-benchmark average"),
    Peer("SCLIP", {}, {"avg8": 38.2}, "SCLIP (Wang et al., ECCV 2024), 8-benchmark average"),
)


def default_data_root() -> Path:
    """``$DETECTRON2_DATASETS`` when set, else ``./datasets`` (the preparation scripts' default)."""
    return Path(os.environ.get("DETECTRON2_DATASETS") or "datasets")


def averages(miou: dict) -> dict:
    """``{"avg8": {...}, "avg10": {...}}`` of a benchmark -> mIoU dict: ``miou`` (None unless every
    member is there), ``partial`` (mean over those present, or None), ``present``, ``benchmarks``."""
    out = {}
    for key, names in AVERAGES.items():
        have = [miou[n] for n in names if miou.get(n) is not None]
        out[key] = {"benchmarks": list(names), "present": len(have),
                    "miou": sum(have) / len(names) if len(have) == len(names) else None,
                    "partial": sum(have) / len(have) if have else None}
    return out


def peer_rows() -> list[dict]:
    """The peers as summary rows: per-benchmark mIoU, averages (published, or computed from the
    per-benchmark numbers and listed in ``computed``) and the source."""
    rows = []
    for p in PEERS:
        avg, computed = dict(p.averages), []
        for key, a in averages(p.miou).items():
            if key not in avg and a["miou"] is not None:
                avg[key] = round(a["miou"], 1)
                computed.append(key)
        rows.append({"method": p.name, "miou": dict(p.miou), "averages": avg, "computed": computed,
                     "source": p.source})
    return rows


def suite_key(reference, protocol: Protocol, dataset: SegDataset, segmenter_kwargs: dict | None) -> str:
    """Fingerprint of one benchmark run: reference path (and the modification times of the files
    in its folder), protocol, segmenter options, layout and image keys (sha1 hex). A stored
    result with the same key is reused."""
    ref = Path(str(reference)) if reference is not None else None
    stamp = sorted((f.name, f.stat().st_mtime_ns) for f in ref.iterdir() if f.is_file()) if ref and ref.is_dir() else None
    blob = json.dumps({"reference": str(reference), "reference_files": stamp, "protocol": protocol.to_dict(),
                       "segmenter": {k: repr(v) for k, v in sorted((segmenter_kwargs or {}).items())},
                       "layout": dataset.meta.get("layout"), "keys": [s.key for s in dataset.samples]},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def _stored(path: Path, key: str) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if d.get("suite_key") == key else None


def run_suite(model, data_root: str | Path, out_dir: str | Path, *, reference_path=None,
              protocol_overrides: dict | None = None, layout: str | None = None, limit: int | None = None,
              num_vis: int = 0, progress: bool = True, segmenter_kwargs: dict | None = None,
              benchmarks=PAPER_BENCHMARKS, evaluate_fn: Callable | None = None) -> dict:
    """Evaluate every benchmark found under ``data_root``; write and return the summary.

    Args:
        model: a [`reme.Segmenter`][reme.Segmenter] (or what `reme.eval.runner.evaluate` accepts), or
            a function of no argument returning one, called once, only when a benchmark needs
            computing (a fully resumed run loads no model).
        data_root: the detectron2 datasets root (`default_data_root`).
        out_dir: output folder: ``<benchmark>/results.json`` (+ ``results.md``,
            ``confusion.png``, ``vis/``), ``summary.json``, ``summary.md``.
        reference_path: reference folder recorded in the reports and the fingerprint.
        protocol_overrides: `reme.eval.protocol.benchmark_protocol` overrides applied to every
            benchmark (each keeps its own defaults otherwise).
        layout: restrict every benchmark to this layout name (``detectron2``, ...).
        limit: evaluate the first N images of each benchmark (a smoke run).
        num_vis: side-by-side PNGs per benchmark.
        progress: tqdm bars.
        segmenter_kwargs: the segmenter's options (part of the fingerprint only).
        benchmarks: benchmark keys to look for (default the paper's ten).
        evaluate_fn: the evaluation function (default `reme.eval.runner.evaluate`).

    Returns:
        The summary dict written to ``summary.json`` (`summary_markdown` renders it).

    Raises:
        FileNotFoundError: ``data_root`` is not a folder. ValueError: unknown benchmark.
    """
    from reme.eval.runner import evaluate

    evaluate_fn = evaluate_fn or evaluate
    data_root, out_dir = Path(data_root), Path(out_dir)
    if not data_root.is_dir():
        raise FileNotFoundError(f"datasets root not found: {data_root} (set --data-root or $DETECTRON2_DATASETS)")
    for name in benchmarks:
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    rows = []
    for name in benchmarks:
        row = {"benchmark": name, "title": BENCHMARKS[name].title}
        homes = BENCHMARKS[name].homes
        try:
            if homes and not any((data_root / h).is_dir() for h in homes):
                raise FileNotFoundError(f"no {' or '.join(homes)} under {data_root}")
            ds = load_benchmark(name, data_root, layout=layout)
        except (FileNotFoundError, ValueError) as exc:
            rows.append({**row, "status": "missing", "reason": str(exc)})
            logger.info("%s: missing (%s)", name, exc)
            continue
        ds = ds.subset(limit) if limit is not None else ds
        protocol = benchmark_protocol(ds.spec, **(protocol_overrides or {}))
        key = suite_key(reference_path, protocol, ds, segmenter_kwargs)
        bench_dir = out_dir / name
        stored = _stored(bench_dir / "results.json", key)
        if stored is None:
            if callable(model) and not hasattr(model, "segment_scores"):
                model = model()
            res = evaluate_fn(model, ds, protocol, out_dir=bench_dir, num_vis=num_vis, progress=progress,
                              reference_path=reference_path)
            stored = {**res.to_dict(), "suite_key": key}
            write_json(stored, bench_dir / "results.json")
            status = "done"
        else:
            status = "resumed"
            logger.info("%s: reusing %s (same reference, protocol and images)", name, bench_dir / "results.json")
        rows.append({**row, "status": status, "miou": stored["miou"], "num_images": stored["num_images"],
                     "layout": (stored.get("dataset_meta") or {}).get("layout", {}).get("name"),
                     "root": stored.get("dataset_root"), "results": str(bench_dir / "results.json")})
    miou = {r["benchmark"]: r["miou"] for r in rows if r.get("miou") is not None}
    summary = {"suite": "paper", "data_root": str(data_root), "reference": str(reference_path),
               "limit": limit, "benchmarks": rows, "miou": miou, "averages": averages(miou),
               "columns": list(benchmarks), "with_background": [b for b in benchmarks if b in WITH_BACKGROUND],
               "peers": peer_rows()}
    write_json(summary, out_dir / "summary.json")
    write_text(summary_markdown(summary), out_dir / "summary.md")
    return summary


def _cell(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def summary_markdown(summary: dict) -> str:
    """The summary as Markdown: a Table-1-style table (reme's row below the peers, each with its
    source), then one line per benchmark (done / resumed / missing and why)."""
    cols = summary["columns"]
    head = ["method"] + [COLUMN_TITLES.get(c, c) + (" (bg)" if c in summary["with_background"] else "")
                         for c in cols] + ["Avg-8", "Avg-10", "source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for p in summary["peers"]:
        avg = [_cell(p["averages"].get(k)) + (" *" if k in p["computed"] else "") for k in AVERAGES]
        lines.append("| " + " | ".join([p["method"]] + [_cell(p["miou"].get(c)) for c in cols] + avg
                                       + [p["source"]]) + " |")
    avg = []
    for k in AVERAGES:
        a = summary["averages"][k]
        avg.append(_cell(a["miou"], 2) if a["miou"] is not None else
                   (f"({_cell(a['partial'], 2)} over {a['present']}/{len(a['benchmarks'])})" if a["present"] else "–"))
    limit = f", first {summary['limit']} images each" if summary.get("limit") else ""
    lines.append("| " + " | ".join(["**reme** (this run)"] + [_cell(summary["miou"].get(c), 2) for c in cols] + avg
                                   + [f"`{summary['reference']}`{limit}"]) + " |")
    out = [f"# Paper suite: {summary['data_root']}", "", "mIoU (%). (bg): benchmark with a background class. "
           "Avg-8: the eight benchmarks without ADE847 and PC459 (the peers' average); Avg-10: all ten; "
           "* = computed here from the published per-benchmark numbers; (x over n/8) = mean over the "
           "benchmarks present, not comparable.", "", *lines, "", "## Benchmarks", ""]
    for r in summary["benchmarks"]:
        if r["status"] == "missing":
            out.append(f"- {r['benchmark']}: missing: {r['reason']}")
        else:
            out.append(f"- {r['benchmark']}: {r['status']}, mIoU {r['miou']:.2f} on {r['num_images']} images "
                       f"({r['layout']} layout, {r['root']}) -> {r['results']}")
    return "\n".join(out) + "\n"


__all__ = ["AVERAGES", "PAPER_BENCHMARKS", "PEERS", "Peer", "WITH_BACKGROUND", "averages", "default_data_root",
           "peer_rows", "run_suite", "suite_key", "summary_markdown"]
