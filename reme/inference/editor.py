"""``OverlayEditor``: the examples a user teaches (docs/examples.md), kept apart from the stateless
[`Predictor`][reme.inference.predictor.Predictor]. It owns an
[`Overlay`][reme.reference.overlay.Overlay]: parses masks, label maps and segment ids into
overlay rows, removes and saves examples, and keeps the merged retrieval tables
([`OverlayTables`][reme.inference.records.OverlayTables]) that `Predictor.predict` searches.
Edits and the tables they produce are guarded by one lock per editor.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from reme.encoders.text import embed_labels
from reme.inference.maps import upsample_nearest
from reme.inference.predictor import Predictor
from reme.inference.records import OverlayTables
from reme.io import load_image_bounded, pixels_key
from reme.proposals import majority_pieces, masks_bboxes
from reme.reference import ReferenceSet
from reme.reference.overlay import (EXAMPLE_SOURCE, Overlay, StackedRows, check_overlay, check_overlay_path,
                                    concat_csr, load_overlay, normalise_label)


def example_image_name(image, img: np.ndarray) -> str:
    """What an added example records as its source image: the path, else ``"array:"`` and 12 hex
    digits of `reme.io.pixels_key`."""
    if isinstance(image, (str, Path)):
        return str(image)
    return "array:" + pixels_key(img)[1].hex()[:12]


class OverlayEditor:
    """Edits one overlay of examples over a predictor's reference set.

    Args:
        predictor: the [`Predictor`][reme.inference.predictor.Predictor] whose reference set,
            encoders and cached image views the examples use.
        overlay: an overlay folder (loaded when it exists, else created there by `save_overlay`),
            an [`Overlay`][reme.reference.overlay.Overlay], or None (an empty in-memory overlay).

    Raises:
        ReferenceSetError: the overlay was made with other encoders than the reference set.
        ValueError: the overlay path is inside the reference folder.
    """

    def __init__(self, predictor: Predictor, overlay: str | Path | Overlay | None = None):
        self.predictor = predictor
        self._lock = threading.RLock()
        ref = predictor.reference
        if overlay is None:
            ov = Overlay.empty(ref)
        elif isinstance(overlay, Overlay):
            ov = overlay
        else:
            path = check_overlay_path(overlay, ref.path)
            ov = load_overlay(path) if (path / "manifest.json").is_file() else Overlay.empty(ref)
            ov.path = path
        check_overlay(ov, ref)
        self.overlay = ov
        self.tables: OverlayTables | None = None
        self._refresh()

    def _refresh(self) -> None:
        """Rebuild the merged retrieval tables after the overlay changed (cheap: the base is never
        copied; S_ref becomes a `StackedRows` view of base + overlay rows on the CPU)."""
        ov, p = self.overlay, self.predictor
        if ov.num_rows == 0:
            self.tables = None
            return
        base = p.reference
        new = ov.new_labels(base.labels)
        ids = ov.label_ids(base.labels)
        S_ov = ov.S if p.device.type == "cpu" else torch.as_tensor(ov.S).to(p.device)
        # the full softmax streams over base + overlay rows: a view on the CPU; on an accelerator
        # one concatenated copy, made only when that path runs (top-k merges two searches)
        S_all = StackedRows([base.S_ref, ov.S]) if p.device.type == "cpu" else None
        L_new = (torch.as_tensor(np.stack([ov.label_embeddings[t] for t in new]), dtype=torch.float32, device=p.device)
                 if new else None)
        self.tables = OverlayTables(S_ov=S_ov, S_all=S_all, o_ref=concat_csr(p.o_ref, ids, base.num_labels + len(new)),
                                    row_labels=ids, new_labels=new, L_new=L_new)

    def examples(self) -> list[dict]:
        """The added examples, one record each ([`Overlay.examples`][reme.reference.overlay.Overlay.examples])."""
        with self._lock:
            return self.overlay.examples()

    def add_examples(self, image, mask_or_segment_ids, label, *, min_purity: float = 0.5,
                     image_name: str | None = None, save: bool = False) -> str:
        """Teach by example ([`Segmenter.add_examples`][reme.inference.segmenter.Segmenter.add_examples]
        documents the arguments).

        Returns:
            The example id; "" when the mask selects nothing.

        Raises:
            ValueError: a mask of the wrong size, segment ids out of range, an empty label, a
                label map value without a name, min_purity outside (0, 1].
            reme.errors.ImageReadError: unreadable image.
        """
        if not 0.0 < float(min_purity) <= 1.0:
            raise ValueError(f"min_purity must lie in (0, 1], got {min_purity}")
        p = self.predictor
        img, full_hw = load_image_bounded(image, max_pixels=p.max_working_pixels)
        props, S_test, feats = p.view(img)
        lm, names = _example_label_map(mask_or_segment_ids, label, props, full_hw, img.shape[:2])
        keep, lab = majority_pieces(props, lm, len(names), float(min_purity))
        if keep.any():
            rows = np.flatnonzero(keep)
            S = S_test[torch.as_tensor(rows, device=S_test.device)].float().cpu().numpy()
            bbox, area, labels = props.bboxes()[rows], props.areas()[rows], [names[i] for i in lab[rows]]
        else:  # a region smaller than every piece: its own mask, pooled
            present = [v for v in np.unique(lm) if v >= 0]
            if not present:
                return ""
            masks = np.stack([lm == v for v in present])
            S = p.visual_encoder.mask_embeddings(feats, masks, image=img).float().cpu().numpy()
            bbox, area = masks_bboxes(masks), masks.reshape(len(masks), -1).sum(1)
            labels = [names[v] for v in present]
        mask_boxes = masks_bboxes(np.stack([lm == names.index(x) for x in dict.fromkeys(labels)]))
        box_of = dict(zip(dict.fromkeys(labels), mask_boxes))
        sy, sx = full_hw[0] / img.shape[0], full_hw[1] / img.shape[1]
        scale = np.array([sx, sy, sx, sy])
        to_src = lambda b: np.round(np.asarray(b, np.float64) * scale).astype(np.int32)  # noqa: E731
        labels = [normalise_label(x) for x in labels]
        box_of = {normalise_label(k): v for k, v in box_of.items()}
        with self._lock:
            embeddings = self._label_rows([x for x in dict.fromkeys(labels) if x not in self.overlay.label_embeddings])
            eid = self.overlay.add(S, labels, image=image_name or example_image_name(image, img),
                                   bbox=to_src(bbox), area=np.round(np.asarray(area) * sx * sy).astype(np.int64),
                                   mask_bbox=to_src(np.stack([box_of[x] for x in labels])),
                                   label_embeddings=embeddings)
            self._refresh()
            if save:
                self.save_overlay()
        return eid

    def _label_rows(self, labels: list[str]) -> dict[str, np.ndarray]:
        """L_ref rows for ``labels``: the base's row for a label it has (reused, so A2 of that
        label is unchanged), else the text encoder's template-ensembled embedding (method step 5)."""
        p = self.predictor
        have = {t: j for j, t in enumerate(p.reference.labels)}
        out = {t: np.asarray(p.reference.L_ref[have[t]], np.float32) for t in labels if t in have}
        new = [t for t in labels if t not in have]
        if new:
            out.update(zip(new, embed_labels(p.text_encoder, new, p.templates).astype(np.float32)))
        return out

    def remove_examples(self, example_id: str | None = None, *, save: bool = False) -> int:
        """Undo: remove the segments of one example (None: the last added; "all": every one).

        Returns:
            How many segments were removed.

        Raises:
            KeyError: no example with that id.
        """
        with self._lock:
            n = self.overlay.clear() if example_id == "all" else self.overlay.remove(example_id)
            self._refresh()
            if save:
                self.save_overlay()
        return n

    def save_overlay(self, path: str | Path | None = None) -> Path:
        """Save the overlay as one transaction and rebuild the tables with the rows it merged in
        ([`Segmenter.save_overlay`][reme.inference.segmenter.Segmenter.save_overlay] documents the
        arguments and return value).

        Raises:
            ValueError, ReferenceSetError: as `Overlay.save`.
        """
        with self._lock:
            out = self.overlay.save(path, base_path=self.predictor.reference.path)
            self._refresh()  # the save merged rows other writers added (Overlay.save)
            return out

    def merged_reference(self) -> ReferenceSet:
        """The reference set `predict` searches: the base's rows and labels followed by the
        overlay's (the base itself when the overlay is empty). S_ref is a `StackedRows` view,
        not a copy; `concat_references([base, overlay.to_reference()])` holds the same rows."""
        with self._lock:
            ref, ov, t = self.predictor.reference, self.overlay, self.tables
            if t is None:
                return ref
            L_new = np.stack([ov.label_embeddings[x] for x in t.new_labels]) if t.new_labels else \
                np.zeros((0, ref.L_ref.shape[1]), np.float32)
            return ReferenceSet(
                S_ref=StackedRows([ref.S_ref, ov.S]), L_ref=np.concatenate([ref.L_ref, L_new]).astype(np.float32),
                pair_segment=np.concatenate([ref.pair_segment, ref.num_segments + np.arange(ov.num_rows)]),
                pair_label=np.concatenate([ref.pair_label, t.row_labels]), labels=list(ref.labels) + t.new_labels,
                roots=list(ref.roots) + t.new_labels, segment_image=list(ref.segment_image) + ov.images,
                segment_bbox=np.concatenate([ref.segment_bbox, ov.bbox]),
                segment_area=np.concatenate([ref.segment_area, ov.area]), manifest=ref.manifest,
                segment_source=list(ref.segment_source) + [EXAMPLE_SOURCE] * ov.num_rows, dropped=ref.dropped)


def _example_label_map(region, label, props, full_hw, work_hw) -> tuple[np.ndarray, list[str]]:
    """(h, w) int label map at the working size and the names its values index."""
    arr = np.asarray(region) if not isinstance(region, (int, np.integer)) else np.asarray([region])
    if arr.ndim == 2:
        if arr.shape != tuple(full_hw) and arr.shape != tuple(work_hw):
            raise ValueError(f"the mask is {arr.shape[1]}x{arr.shape[0]}, the image {full_hw[1]}x{full_hw[0]}")
        if arr.dtype == bool:
            names = [normalise_label(label)]
            lm = arr.astype(np.int64) - 1                                  # True -> 0, False -> -1
        elif np.issubdtype(arr.dtype, np.integer):
            if isinstance(label, str) or not isinstance(label, Sequence):
                raise ValueError("an int label map needs label= the list of names its values index")
            names = [normalise_label(x) for x in label]
            lm = arr.astype(np.int64)
            if lm.max(initial=-1) >= len(names):
                raise ValueError(f"label map value {int(lm.max())} has no name ({len(names)} names)")
        else:
            raise ValueError(f"a mask must be bool or int, got {arr.dtype}")
        return upsample_nearest(lm, tuple(work_hw)), names
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError("mask_or_segment_ids must be an (H, W) mask or label map, or segment ids (ints)")
    if arr.min() < 0 or arr.max() >= props.num:
        raise ValueError(f"segment ids must lie in [0, {props.num}) for this image, got {arr.min()}..{arr.max()}")
    sel = np.zeros(props.num, bool)
    sel[arr] = True
    if props.masks is None:
        lm = np.where(sel[props.segment_ids], 0, -1)
    else:
        lm = np.where(props.masks[sel].any(0), 0, -1)
    return lm, [normalise_label(label)]
