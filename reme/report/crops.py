"""Crops of reference segments from their source images, for evidence and inspection.

A reference set stores, per segment, the source-image key relative to the build's image root
(``segment_image``) and an XYWH box (``segment_bbox``); it stores no pixels. To show a
reference segment, [`ReferenceImages`][reme.report.crops.ReferenceImages] finds the source file under one
of the image roots and [`crop_thumbnail`][reme.report.crops.crop_thumbnail] cuts the box out. When no root
is readable (a reference set used on another machine), callers draw
[`placeholder_thumbnail`][reme.report.crops.placeholder_thumbnail] instead.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reme.errors import ImageReadError
from reme.io import load_image

logger = logging.getLogger(__name__)

#: Thumbnail edge in pixels (our choice: legible at 6-10 per row on a laptop screen).
THUMB = 112


def image_roots_from_manifest(manifest: dict[str, Any]) -> list[Path]:
    """Folders that may hold a reference set's source images, from its manifest.

    Reads ``image_root`` (a folder written by ``reme build-reference``), the ``image_root``
    of each entry of ``parts`` (concatenated sets), and the form
    ``"shared/data: a/b + c/d"`` that ``scripts/build_default_reference.py`` writes, whose
    folders are taken relative to `reme.defaults.shared_data_dir`. Only existing
    folders are returned.
    """
    from reme.defaults import shared_data_dir

    texts = [manifest.get("image_root")] + [p.get("image_root") for p in manifest.get("parts", []) or []]
    roots: list[Path] = []
    for text in texts:
        if not text:
            continue
        m = re.match(r"^\s*shared/data\s*:\s*(.+)$", str(text))
        if m:
            base = shared_data_dir()
            if base is not None:
                roots += [base / part.strip() for part in m.group(1).split("+") if part.strip()]
        else:
            roots.append(Path(text))
    seen, out = set(), []
    for r in roots:
        if r not in seen and r.is_dir():
            seen.add(r)
            out.append(r)
    return out


class ReferenceImages:
    """Finds and caches reference source images.

    Args:
        roots: folders to search, in order; a key ``k`` resolves to the first ``root / k``
            that is a file.
        cache_size: decoded images kept in memory (LRU).
    """

    def __init__(self, roots: Sequence[str | Path] = (), cache_size: int = 32):
        self.roots = [Path(r) for r in roots]
        self._cache: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self._cache_size = int(cache_size)

    @classmethod
    def for_reference(cls, reference, extra_roots: Sequence[str | Path] = ()) -> "ReferenceImages":
        """Roots given by the user first, then those the manifest names."""
        return cls(list(extra_roots) + image_roots_from_manifest(reference.manifest))

    @property
    def readable(self) -> bool:
        """True when at least one image root exists."""
        return any(r.is_dir() for r in self.roots)

    def path(self, key: str) -> Path | None:
        """The file of an image key, or None when no root holds it."""
        rel = Path(key)
        if rel.is_absolute() or ".." in rel.parts:
            return None
        for root in self.roots:
            p = root / rel
            if p.is_file():
                return p
        return None

    def image(self, key: str) -> np.ndarray | None:
        """(H, W, 3) uint8 source image of ``key``, or None when unavailable or unreadable."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        p = self.path(key)
        img = None
        if p is not None:
            try:
                img = load_image(p)
            except ImageReadError as exc:
                logger.warning("cannot read reference image %s: %s", p, exc)
        self._cache[key] = img
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return img

    def thumbnail(self, key: str, bbox, size: int = THUMB, note: str = "") -> Image.Image:
        """Crop of ``bbox`` (XYWH) from image ``key`` as a ``size`` x ``size`` tile, or a
        placeholder tile saying the image is not available."""
        img = self.image(key)
        if img is None:
            return placeholder_thumbnail(size, "image not available", key)
        return crop_thumbnail(img, bbox, size)


def crop_thumbnail(image: np.ndarray, bbox, size: int = THUMB, mask: np.ndarray | None = None,
                   margin: float = 0.15) -> Image.Image:
    """A square tile showing ``bbox`` of ``image``, with a margin of context.

    Args:
        image: (H, W, 3) uint8 RGB.
        bbox: (x, y, w, h) in pixels.
        size: tile edge in pixels.
        mask: optional (H, W) bool; pixels outside it are dimmed and its outline drawn.
        margin: context added around the box, as a fraction of its longer side.

    Returns:
        An RGB PIL image of ``size`` x ``size``, the crop letterboxed on grey.
    """
    H, W = image.shape[:2]
    x, y, w, h = (int(v) for v in bbox)
    pad = int(round(margin * max(w, h)))
    x0, y0 = max(0, x - pad), max(0, y - pad)
    x1, y1 = min(W, x + max(w, 1) + pad), min(H, y + max(h, 1) + pad)
    crop = image[y0:y1, x0:x1].astype(np.float32)
    if mask is not None:
        m = mask[y0:y1, x0:x1]
        crop = np.where(m[..., None], crop, crop * 0.35)
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        crop[edge] = (255, 255, 0)
    tile = Image.fromarray(crop.clip(0, 255).astype(np.uint8))
    tile.thumbnail((size, size), Image.Resampling.LANCZOS if max(tile.size) > size else Image.Resampling.NEAREST)
    if max(tile.size) < size:  # upscale small crops so tiles are comparable
        s = size / max(tile.size)
        tile = tile.resize((max(1, round(tile.width * s)), max(1, round(tile.height * s))), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (size, size), (200, 200, 200))
    canvas.paste(tile, ((size - tile.width) // 2, (size - tile.height) // 2))
    if mask is None:
        ImageDraw.Draw(canvas).rectangle(_box_in_tile((x, y, w, h), (x0, y0, x1, y1), tile.size, size),
                                         outline=(255, 255, 0))
    return canvas


def _box_in_tile(bbox, window, tile_size, size):
    x, y, w, h = bbox
    x0, y0, x1, y1 = window
    sx, sy = tile_size[0] / max(1, x1 - x0), tile_size[1] / max(1, y1 - y0)
    ox, oy = (size - tile_size[0]) // 2, (size - tile_size[1]) // 2
    left, top = ox + (x - x0) * sx, oy + (y - y0) * sy
    return [left, top, max(left, ox + (x - x0 + w) * sx - 1), max(top, oy + (y - y0 + h) * sy - 1)]


def placeholder_thumbnail(size: int = THUMB, title: str = "image not available", detail: str = "") -> Image.Image:
    """A grey ``size`` x ``size`` tile with a short note (used when the source image is not readable)."""
    tile = Image.new("RGB", (size, size), (225, 225, 225))
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default()
    draw.rectangle([0, 0, size - 1, size - 1], outline=(150, 150, 150))
    lines = _wrap(title, font, size - 8) + _wrap(Path(detail).name if detail else "", font, size - 8)
    for r, line in enumerate(lines[:6]):
        draw.text((4, 4 + 12 * r), line, fill=(80, 80, 80), font=font)
    return tile


def _wrap(text: str, font, width: int) -> list[str]:
    lines, cur = [], ""
    for ch in text:
        if font.getlength(cur + ch) > width:
            lines.append(cur)
            cur = ch
        else:
            cur += ch
    return lines + ([cur] if cur else [])


def label_tile(tile: Image.Image, lines: Sequence[str], width: int | None = None) -> Image.Image:
    """``tile`` with text lines printed underneath (12 px per line, truncated to fit)."""
    font = ImageFont.load_default()
    width = width or tile.width
    out = Image.new("RGB", (width, tile.height + 4 + 12 * len(lines)), (255, 255, 255))
    out.paste(tile, ((width - tile.width) // 2, 0))
    draw = ImageDraw.Draw(out)
    for r, line in enumerate(lines):
        if font.getlength(line) > width - 2:
            while line and font.getlength(line + "..") > width - 2:
                line = line[:-1]
            line += ".."
        draw.text((1, tile.height + 2 + 12 * r), line, fill=(0, 0, 0), font=font)
    return out
