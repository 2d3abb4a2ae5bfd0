"""Label-map rendering: palette PNGs and colour overlays with a legend."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reme.io import atomic_path


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours; the first 256 follow the PASCAL VOC bit-interleaved colormap
    (index 0 black), so palette PNGs look familiar in every viewer."""
    out = np.zeros((max(n, 256), 3), np.uint8)
    for i in range(out.shape[0]):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out[:n]


def class_colors(n: int) -> np.ndarray:
    """(n, 3) uint8 display colours for classes 0..n-1 (VOC colormap without black)."""
    return palette(n + 1)[1:]


#: Most classes a label PNG can hold: 8-bit palette PNG up to 256, 16-bit grey PNG above.
MAX_LABEL_PNG_CLASSES = 65536
#: Label PNG value of an unlabelled pixel (label_map -1, "none of these"): 8-bit palette PNGs
#: (<= 255 classes) and 16-bit maps.
PNG_UNLABELLED_8 = 255
PNG_UNLABELLED_16 = 65535
#: Legend text of unlabelled pixels in `overlay`.
UNLABELLED_LEGEND = "unlabelled (none of these)"


def save_label_png(label_map: np.ndarray, path: str | Path, n_classes: int | None = None) -> None:
    """Write an (H, W) label map as a PNG whose pixel values are the class indices;
    ``np.array(Image.open(path))`` gives the map back. Written atomically.

    Up to 256 classes (``n_classes``, else the largest value + 1): an 8-bit palette PNG
    coloured like `overlay`. More: a 16-bit greyscale PNG (uint16 values; no colours),
    so one run writes the same format for every image.

    Unlabelled pixels (value -1, "none of these") are written as `PNG_UNLABELLED_8` (255,
    black) in an 8-bit PNG, which then holds at most 255 classes (256 classes with unlabelled
    pixels go to 16 bits), and as `PNG_UNLABELLED_16` (65535) in a 16-bit PNG.

    Raises:
        ValueError: a value < -1, or >= ``n_classes``, or more than
            `MAX_LABEL_PNG_CLASSES` classes (65535 with unlabelled pixels).
    """
    lo, hi = int(label_map.min(initial=0)), int(label_map.max(initial=0))
    n = hi + 1 if n_classes is None else int(n_classes)
    if lo < -1 or hi >= max(n, 1):
        raise ValueError(f"label values {lo}..{hi} do not fit {n} classes")
    if n > MAX_LABEL_PNG_CLASSES - (lo < 0):
        raise ValueError(f"a label PNG holds at most {MAX_LABEL_PNG_CLASSES - (lo < 0)} classes, got {n}")
    if n <= 256 - (lo < 0):
        values = label_map if lo >= 0 else np.where(label_map < 0, PNG_UNLABELLED_8, label_map)
        img = Image.fromarray(values.astype(np.uint8), mode="P")
        img.putpalette(np.concatenate([class_colors(255), np.zeros((1, 3), np.uint8)]).ravel().tolist())
    else:
        values = label_map if lo >= 0 else np.where(label_map < 0, PNG_UNLABELLED_16, label_map)
        img = Image.fromarray(values.astype(np.uint16))  # mode I;16: 16-bit grey PNG
    with atomic_path(path, ".png") as tmp:
        img.save(tmp, format="PNG")


def overlay(image: np.ndarray, label_map: np.ndarray, classes: Sequence[str], alpha: float = 0.5,
            fractions: Sequence[float] | None = None, unlabelled_fraction: float | None = None) -> Image.Image:
    """Colour overlay of a label map on its image, with a legend strip on the right.

    Unlabelled pixels (label -1, "none of these") keep the photo's own colours and get the last
    legend entry, `UNLABELLED_LEGEND` with an empty swatch and their share.

    Args:
        image: (H, W, 3) uint8 RGB.
        label_map: (H, W) int class indices, -1 = unlabelled.
        classes: C class names.
        alpha: label colour opacity in [0, 1].
        fractions: optional (C,) pixel fractions printed in the legend.
        unlabelled_fraction: share of unlabelled pixels for the legend (default: counted
            from ``label_map``; the entry is shown when it is > 0).

    Returns:
        A PIL RGB image of width W + legend width, height max(H, legend height).
    """
    colors = class_colors(len(classes))
    unl = label_map < 0
    has_unl = bool(unl.any())
    if fractions is not None:
        present = [i for i in range(len(classes)) if fractions[i] > 0]
    else:
        present = np.flatnonzero(np.bincount(label_map[~unl].ravel() if has_unl else label_map.ravel(),
                                             minlength=len(classes))).tolist()
    if unlabelled_fraction is None:
        unlabelled_fraction = float(unl.mean()) if has_unl else 0.0
    font = ImageFont.load_default()
    row_h, pad = 18, 6
    texts = [f"{classes[i]}" + (f"  {100 * fractions[i]:.1f}%" if fractions is not None else "") for i in present]
    if unlabelled_fraction > 0:
        texts.append(f"{UNLABELLED_LEGEND}  {100 * unlabelled_fraction:.1f}%")
    width = max([int(font.getlength(t)) for t in texts] + [40]) + row_h + 3 * pad
    H, W = label_map.shape
    canvas = Image.new("RGB", (W + width, max(H, pad + row_h * len(texts) + pad)), (255, 255, 255))
    step = max(1, (1 << 22) // max(W, 1))  # blended in strips of ~4 MP: memory is the canvas, not H x W floats
    for r in range(0, H, step):
        lm = label_map[r:r + step]
        strip = (image[r:r + step].astype(np.float32) * (1 - alpha)
                 + colors[np.maximum(lm, 0) if has_unl else lm].astype(np.float32) * alpha).astype(np.uint8)
        if has_unl:
            strip[lm < 0] = image[r:r + step][lm < 0]                                # unlabelled: the photo
        canvas.paste(Image.fromarray(strip), (0, r))
    draw = ImageDraw.Draw(canvas)
    for r, t in enumerate(texts):
        y = pad + r * row_h
        box = [W + pad, y + 2, W + pad + row_h - 6, y + row_h - 4]
        if r < len(present):
            draw.rectangle(box, fill=tuple(int(c) for c in colors[present[r]]))
        else:                                                                        # unlabelled: empty swatch
            draw.rectangle(box, outline=(96, 96, 96))
        draw.text((W + pad + row_h, y + 2), t, fill=(0, 0, 0), font=font)
    return canvas
