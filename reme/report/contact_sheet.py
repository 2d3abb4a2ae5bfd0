"""Contact sheet: each test segment beside its nearest reference segments (retrieval evidence).

One row per test segment: the segment's crop from the test image (outside pixels dimmed, outline
in yellow) with its predicted class, then the crops of the reference segments behind its A1 row
([`reme.inference.evidence`][reme.inference.evidence]), each captioned with its labels, cosine similarity and eq. 1
weight.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reme.report.crops import THUMB, ReferenceImages, crop_thumbnail, label_tile
from reme.inference.evidence import RetrievalEvidence
from reme.io import atomic_path


def largest_segments(segment_ids: np.ndarray, n: int) -> list[int]:
    """Ids of the ``n`` largest segments of an (H, W) id map, largest first."""
    area = np.bincount(segment_ids.ravel())
    order = np.argsort(-area, kind="stable")
    return [int(i) for i in order[:n] if area[i] > 0]


def segment_bbox(segment_ids: np.ndarray, segment: int) -> tuple[int, int, int, int]:
    """XYWH box of one segment of an (H, W) id map.

    Raises:
        ValueError: the segment id does not occur in the map.
    """
    ys, xs = np.nonzero(segment_ids == segment)
    if ys.size == 0:
        raise ValueError(f"segment {segment} does not occur in the segment-id map")
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def contact_sheet(image: np.ndarray, segment_ids: np.ndarray, evidence: RetrievalEvidence, reference, *,
                  segments: Sequence[int] | None = None, max_segments: int = 8,
                  images: ReferenceImages | None = None, classes: Sequence[str] | None = None,
                  segment_scores: np.ndarray | None = None, neighbours: int | None = None,
                  size: int = THUMB) -> Image.Image:
    """Render the contact sheet.

    Args:
        image: (H, W, 3) uint8 test image.
        segment_ids: (H, W) int proposal id of each pixel (rows of ``evidence``).
        evidence: [`reme.inference.evidence.retrieval_evidence`][reme.inference.evidence.retrieval_evidence] of this
            image's S_test.
        reference: the [`reme.reference.ReferenceSet`][reme.reference.ReferenceSet] (labels and
            provenance).
        segments: test segment ids to show (default: the ``max_segments`` largest).
        images: where to read reference source images (default: the manifest's image roots);
            an unreadable image gives a placeholder tile.
        classes: C class names, with ``segment_scores`` (k, C) P_seg: adds the predicted class
            of each test segment to its caption.
        neighbours: reference tiles per row (default all of ``evidence``'s columns).
        size: tile edge in pixels.

    Returns:
        An RGB PIL image.
    """
    images = images or ReferenceImages.for_reference(reference)
    segments = list(segments) if segments is not None else largest_segments(segment_ids, max_segments)
    t = evidence.reference_ids.shape[1] if neighbours is None else min(neighbours, evidence.reference_ids.shape[1])
    col_w = size + 8
    rows = []
    for s in segments:
        tiles = []
        cap = [f"test segment {s}"]
        if classes is not None and segment_scores is not None:
            c = int(np.argmax(segment_scores[s]))
            cap.append(f"-> {classes[c]} ({segment_scores[s, c]:.2f})")
        test = crop_thumbnail(image, segment_bbox(segment_ids, s), size, mask=segment_ids == s)
        tiles.append(label_tile(test, cap + [""], col_w))
        for r, sim, w, ids in zip(evidence.reference_ids[s, :t], evidence.similarity[s, :t],
                                  evidence.weight[s, :t], evidence.label_ids[s][:t]):
            if r < 0:
                continue
            thumb = images.thumbnail(reference.segment_image[r], reference.segment_bbox[r], size)
            labs = ", ".join(reference.labels[j] for j in ids) or "(no label)"
            tiles.append(label_tile(thumb, [labs, f"sim {sim:.3f}", f"w {w:.3f}"], col_w))
        rows.append(tiles)
    font = ImageFont.load_default()
    header = 22
    height = header + sum(max(t.height for t in row) + 6 for row in rows) if rows else header + 20
    width = max((len(row) * col_w + 12 for row in rows), default=300) + 6
    sheet = Image.new("RGB", (max(width, 420), height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    scale = "all reference segments" if evidence.support is None else f"top {evidence.support}"
    draw.text((6, 5), f"test segment | nearest reference segments (eq. 1, tau1={evidence.logit_scale:g}, "
                      f"softmax over {scale})", fill=(0, 0, 0), font=font)
    y = header
    for row in rows:
        x = 6
        for i, tile in enumerate(row):
            sheet.paste(tile, (x, y))
            x += col_w + (12 if i == 0 else 0)
        draw.line([(6 + col_w + 4, y), (6 + col_w + 4, y + size)], fill=(160, 160, 160))
        y += max(t.height for t in row) + 6
    return sheet


def save_contact_sheet(sheet: Image.Image, path) -> None:
    """Write the sheet as PNG atomically."""
    with atomic_path(path, ".png") as tmp:
        sheet.save(tmp, format="PNG")
