"""Evaluation outputs: JSON, Markdown tables, confusion-matrix and curve plots (matplotlib),
side-by-side PNGs (image | ground truth | prediction). Every file is written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reme.io import atomic_path
from reme.report.viz import class_colors

#: Colour of ignored GT pixels (black; the class colours never use it).
IGNORE_COLOR = (0, 0, 0)
#: Colour of "others" / distractor answers.
UNMATCHED_COLOR = (128, 128, 128)


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_json(obj: dict, path: str | Path) -> None:
    """Pretty JSON (NaN written as null), atomically."""
    def clean(x):
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        return x
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(clean(obj), indent=2) + "\n")


def write_text(text: str, path: str | Path) -> None:
    """A text file, atomically."""
    with atomic_path(path, ".txt") as tmp:
        tmp.write_text(text)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None,
                   digits: int = 2) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) restricted to ``columns``."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def result_markdown(res: dict) -> str:
    """Markdown report of one evaluation result dict (`EvalResult.to_dict`)."""
    p = res["protocol"]
    ref = res.get("reference", {})
    head = [
        f"## {res['dataset']}: mIoU {_fmt(res['miou'])}",
        "",
        f"- images: {res['num_images']} (skipped {len(res.get('skipped', []))}), "
        f"{_fmt(res.get('seconds_per_image'))} s/image",
        f"- reference: `{ref.get('path')}` ({ref.get('mode')}, {ref.get('num_segments')} segments, "
        f"encoders {ref.get('encoders')})",
        f"- protocol: short side {p['short_side']}, mode {p['mode']}"
        + (f" (crop {p['crop']}, stride {p['stride']})" if p["mode"] == "slide" else "")
        + (f", background {p['background']} (threshold {p['bg_threshold']})" if res.get("background_class") else "")
        + (f", others below {p['others_threshold']}" if p.get("others_threshold") is not None else "")
        + f", synonyms {'on' if p['synonyms'] else 'off'}",
        "",
    ]
    summary = markdown_table([{"m": "mIoU", "v": res["miou"]}, {"m": "pixel accuracy", "v": res["pixel_acc"]},
                              {"m": "mean accuracy", "v": res["mean_acc"]},
                              {"m": f"majority class ({res['majority']['class']}) mIoU", "v": res["majority"]["miou"]},
                              {"m": "majority class pixel accuracy", "v": res["majority"]["pixel_acc"]}],
                             ["m", "v"], ["metric", "value (%)"])
    rows = [{"c": n, "iou": res["iou"][n], "acc": res["acc"][n], "gt": 100.0 * res["gt_fraction"][n]}
            for n in res["classes"] if res["gt_fraction"][n] > 0 or _fmt(res["iou"][n]) != "–"]
    per_class = markdown_table(rows, ["c", "iou", "acc", "gt"], ["class", "IoU", "accuracy", "GT pixels %"])
    return "\n".join(head) + "\n" + summary + "\n" + per_class


def save_confusion_png(cm: np.ndarray, names: Sequence[str], path: str | Path, *, max_classes: int = 30,
                       title: str = "") -> None:
    """Row-normalised confusion matrix (recall per GT class) as a PNG.

    Args:
        cm: (P, P) counts (rows GT, columns prediction); rows beyond ``len(names)`` are
            dropped, extra columns are summed into one "other answers" column.
        names: C class names.
        max_classes: show the classes with most GT pixels, at most this many.
        title: figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    C = len(names)
    cm = np.asarray(cm, np.float64)
    extra = cm[:C, C:].sum(1) if cm.shape[1] > C else None
    gt = cm[:C].sum(1)
    order = [i for i in np.argsort(-gt, kind="stable") if gt[i] > 0][:max_classes]
    order = sorted(order) if order else list(range(min(C, max_classes)))
    sub = cm[np.ix_(order, order)]
    labels_x = [names[i] for i in order]
    if extra is not None:
        sub = np.concatenate([sub, extra[order, None]], axis=1)
        labels_x = labels_x + ["(other answers)"]
    rowsum = cm[:C].sum(1)[order][:, None]
    norm = np.divide(sub, rowsum, out=np.zeros_like(sub), where=rowsum > 0)
    n = len(order)
    size = max(4.0, 0.28 * n + 2.5)
    fig = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(labels_x)))
    ax.set_xticklabels(labels_x, rotation=90, fontsize=7)
    ax.set_yticks(range(n))
    ax.set_yticklabels([names[i] for i in order], fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    shown = f" ({n} of {C} classes, most GT pixels)" if n < C else ""
    ax.set_title((title or "confusion matrix, rows normalised") + shown, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_curves(xs: Sequence[float], series: dict[str, Sequence[float]], path: str | Path, *, xlabel: str,
                ylabel: str, title: str = "", logx: bool = False) -> None:
    """Line plot of one or more series against ``xs`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def colorize(label_map: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8: class colours, -1 (ignore) black, ids >= C grey."""
    colors = np.concatenate([class_colors(num_classes), np.array([UNMATCHED_COLOR, IGNORE_COLOR], np.uint8)])
    idx = np.where(label_map < 0, num_classes + 1, np.minimum(label_map, num_classes))
    return colors[idx]


def side_by_side(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, names: Sequence[str],
                 title: str = "") -> Image.Image:
    """Image | ground truth | prediction, with a legend of the classes present.

    Args:
        image: (H, W, 3) uint8.
        gt: (H, W) int class ids, -1 = ignore (black).
        pred: (H, W) int class ids; ids >= C ("others" / distractor answers) in grey.
        names: C class names.
        title: text above the panels.

    Returns:
        PIL RGB image, width 3 W (+ gaps).
    """
    C = len(names)
    H, W = gt.shape
    gap, top = 4, 18
    present = sorted(set(np.unique(gt[gt >= 0]).tolist()) | set(np.unique(pred).tolist()))
    font = ImageFont.load_default()
    entries = [(names[i] if i < C else "(other answers)", i) for i in present]
    row_h = 14
    per_row = max(1, (3 * W + 2 * gap) // 160)
    legend_h = row_h * math.ceil(len(entries) / per_row) + 6 if entries else 0
    canvas = Image.new("RGB", (3 * W + 2 * gap, top + H + legend_h), (255, 255, 255))
    for k, panel in enumerate((image, colorize(gt, C), colorize(pred, C))):
        canvas.paste(Image.fromarray(np.ascontiguousarray(panel)), (k * (W + gap), top))
    draw = ImageDraw.Draw(canvas)
    for k, label in enumerate(("image", "ground truth", "prediction")):
        draw.text((k * (W + gap) + 2, 3), label + (f"   {title}" if k == 0 and title else ""), fill=(0, 0, 0), font=font)
    colors = np.concatenate([class_colors(C), np.array([UNMATCHED_COLOR], np.uint8)])
    for n, (text, i) in enumerate(entries):
        x = (n % per_row) * 160 + 2
        y = top + H + 3 + (n // per_row) * row_h
        draw.rectangle([x, y + 2, x + 9, y + 11], fill=tuple(int(c) for c in colors[min(i, C)]))
        draw.text((x + 13, y), text[:24], fill=(0, 0, 0), font=font)
    return canvas


def save_side_by_side(image, gt, pred, names, path: str | Path, title: str = "") -> None:
    """`side_by_side` written as a PNG, atomically."""
    with atomic_path(path, ".png") as tmp:
        side_by_side(image, gt, pred, names, title).save(tmp, format="PNG")
