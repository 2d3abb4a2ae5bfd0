"""``Segmenter``: open-vocabulary semantic segmentation of one image by retrieval
(docs/method.md Part 2)."""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from reme.checks import check_logit_scale, check_others_threshold
from reme.classes import parse_classes
from reme.encoders import resolve_device, resolve_encoder
from reme.errors import ReferenceSetError
from reme.io import load_image, load_image_bounded
from reme.reference.overlay import (EXAMPLE_SOURCE, Overlay, StackedRows, check_overlay, check_overlay_path, concat_csr,
                          load_overlay, normalise_label)
from reme.encoders.pooling import embed_proposals
from reme.proposals import FelzenszwalbParams, ProposalGenerator, majority_pieces, masks_bboxes
from reme.reference import ReferenceSet, load_reference
from reme.inference.retrieval import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TOPK_CANDIDATES,
    exact_topk,
    label_affinity,
    normalise_rows,
    o_ref_csr,
    pixel_class_scores,
    pixel_class_scores_masks,
    reference_class_scores,
    rescore,
    segment_class_scores,
    streamed_label_affinity,
    topk_class_scores,
)
from reme.encoders.text import TEMPLATES, embed_labels
from reme.inference import unlabelled as none_rules

logger = logging.getLogger(__name__)

#: Defaults chosen by us on CamVid train->val (GT reference of 68k segments, classical encoder,
#: 30 val images; docs/method.md "Choosing the logit scales"): paper form (1, 1, all) 2.9 mIoU
#: (majority class everywhere), scale 100 over all segments 30.2, top-k 5-10 at scale 50-100
#: 43.0-43.7. The literal paper form is segment_logit_scale=1, label_logit_scale=1, top_k=None.
DEFAULT_SEGMENT_LOGIT_SCALE = 50.0
DEFAULT_LABEL_LOGIT_SCALE = 50.0
DEFAULT_TOP_K: int | None = 10
#: Working resolution of `Segmenter.predict`: larger inputs are segmented (proposals,
#: encoder, pooling) at this many pixels (aspect ratio kept, bilinear; a JPEG is decoded at
#: reduced size) and the label map is brought back to the input size (nearest; ``probs``
#: bilinear). 2 MP: a 2048 x 1024 Cityscapes frame and every benchmark image fit unchanged.
#: Peak memory is then flat in the input size past it (docs/performance.md, "Large photos").
DEFAULT_MAX_WORKING_PIXELS = 2048 * 1024

#: Class lists whose A2 (eq. 2) a Segmenter keeps (`Segmenter._class_affinity`); our choice.
A2_CACHE_SIZE = 4


@dataclass
class SegmentationResult:
    """Output of [`Segmenter.predict`][reme.inference.segmenter.Segmenter.predict].

    (H, W) is the input image's size. An input over the Segmenter's ``max_working_pixels`` is
    segmented at a smaller working size (``extras["working_size"]``); the maps are then
    brought back to (H, W): nearest for ``label_map`` and ``segment_ids``, bilinear for
    ``probs``.

    Attributes:
        label_map: (H, W) int32, index into ``classes`` of each pixel, or
            `reme.inference.unlabelled.UNLABELLED` (-1) where no asked class fits ("none of
            these", docs/method.md; off with ``Segmenter(unlabelled=False)``).
        classes: the C class *display names*: the first synonym of each class as given
            (``"floor; ground"`` gives ``"floor"``; `reme.classes.parse_classes`), plus
            ``"others"`` when ``others_threshold`` is set. Order as given.
        segment_ids: (H, W) int32 proposal id of each pixel (0..k-1).
        segment_scores: (k, C) float32 P_seg = A1 A2 (eqs. 1-2), values >= 0. Not a
            distribution: a row does not sum to 1. Eq. 2's softmax runs over every synonym
            string, and merging the synonyms of a class by max drops the others' share (rows
            of 0.75-1.0 are typical with the embedded reference, whose segments carry one
            label each); a reference segment paired with several labels votes once per label
            (rows can then exceed 1). Compare values within a row (argmax), or normalise rows
            (`reme.inference.retrieval.normalise_rows`) for a distribution.
        class_fractions: (C,) float64 fraction of pixels assigned to each class.
        scores: (H, W, C) float32 P_test (eq. 3: the P_seg row of each pixel's segment, same
            row sums as ``segment_scores``), only with ``return_scores=True`` (else None).
        extras: ``working_size`` (h, w), the size the image was segmented at; with the
            "none of these" rule also ``unlabelled_segments`` (k,) bool, ``none_scores`` (k,)
            float32 (the none column of P_seg', NaN when that rule is off) and
            ``nearest_similarity`` (k,) float32 (cosine of each segment's nearest reference
            segment, NaN when the support rule is off).
        unlabelled_fraction: fraction of pixels left unlabelled (``label_map`` -1; 0 when the
            rule is off).
        coverage: per class a [`ClassCoverage`][reme.inference.unlabelled.ClassCoverage] (its
            nearest reference labels and whether one reaches t_none); None when the rule is off.
        evidence: `reme.inference.evidence.RetrievalEvidence`, the nearest reference segments
            behind each test segment's A1 row, only with ``return_evidence=True`` (else None).
    """

    label_map: np.ndarray
    classes: list[str]
    segment_ids: np.ndarray
    segment_scores: np.ndarray
    class_fractions: np.ndarray
    scores: np.ndarray | None = None
    extras: dict = field(default_factory=dict)
    evidence: Any = None
    unlabelled_fraction: float = 0.0
    coverage: list | None = None


class Segmenter:
    """Training-free open-vocabulary segmenter (ReME inference, docs/method.md Part 2).

    Args:
        reference: a reference folder path or a loaded
            [`ReferenceSet`][reme.reference.ReferenceSet].
        visual_encoder: spec of the visual encoder (``reme.encoders.resolve_encoder``) or an
            encoder object; None = the one the reference set was built with (manifest). The
            encoder also embeds the segments: mask average pooling, or a GFA fusion of two
            encoders (``gfa:`` specs, [`reme.encoders.fused`][reme.encoders.fused]), or CLS
            embeddings of masked crops (``cls:`` specs,
            [`reme.encoders.masked_crop`][reme.encoders.masked_crop]).
        text_encoder: spec or object for L_test; None = the manifest's.
        felzenszwalb: proposal settings; None = the manifest's (else FreeDA's 100/1.0/20).
        segment_logit_scale: tau1 of eq. 1's softmax (paper form: 1.0). Default 50, chosen by
            us (module constants, measured on CamVid).
        label_logit_scale: tau2 of eq. 2's softmax (paper form: 1.0). Default 50, chosen by us.
        top_k: restrict eq. 1's softmax to the top_k nearest reference segments; None = all
            (paper form). Default 10, chosen by us.
        templates: prompt templates for class names; None = the manifest's (docs/method.md step 5).
        allow_encoder_mismatch: use encoders whose spec differs from the manifest's (same
            dimension still required); for local copies of the same weights.
        device: "cpu", "cuda", ... or None (CUDA if available).
        chunk_size: reference rows per block in eq. 1 (memory vs speed).
        retrieval: how eq. 1 finds reference segments. "exact" (default): streamed over all of
            S_ref (the full softmax, or an exact top_k search). "topk": the reference set's
            FAISS index (``index.faiss``; built in memory when missing) proposes ``top_k``
            neighbours (`reme.inference.retrieval.DEFAULT_TOPK_CANDIDATES` when top_k is None, with a
            UserWarning: the paper form's full softmax is not reachable on this path),
            re-scored exactly, softmax over them; approximate for IVF indexes (reference sets
            of 200k+ segments), ~30-100x faster at 1e6 segments (docs/performance.md).
        proposals: class-agnostic proposal generator for the test image
            ([`reme.proposals.ProposalGenerator`][reme.proposals.ProposalGenerator]): "felzenszwalb"
            (docs/method.md step 1), "cluster" (Split Matching's k-means over the visual encoder's dense
            features, [`reme.proposals.cluster`][reme.proposals.cluster]), or "sam" / "sam:MODEL"
            (SAM automatic masks, 32 x 32 grid, [`reme.proposals.sam`][reme.proposals.sam]; hub id
            or local folder, default facebook/sam-vit-huge). None (default) = the method the
            reference set was built with (manifest), else "felzenszwalb". SAM's masks overlap: each
            is pooled on its own (``reme.encoders.pooling.masks_average_pool``) and eq. 3 sums P_seg over the
            masks covering a pixel (``reme.inference.retrieval.pixel_class_scores_masks``); ``segment_ids``
            then shows the smallest mask covering each pixel.
        n_clusters: k of the "cluster" proposals; None = the manifest's, else 8.
        smooth_omega: in [0, 1); > 0 smooths P_seg over the test image's segment adjacency
            graph with the GFA random walk of OVSNet
            ([`reme.encoders.gfa.smooth_segment_probs`][reme.encoders.gfa.smooth_segment_probs], edges weighted by
            S_test similarity). 0 (default) = off.
        others_threshold: when set, a segment whose normalised confidence (max of its P_seg row
            divided by the row sum, in [1/C, 1]) is below it is labelled "others", an extra
            class appended to ``classes`` (OpenBench). None (default) = off.
        max_working_pixels: `predict` segments larger images at this many pixels
            (aspect ratio kept) and brings the maps back to the input size, so memory and
            time stop growing with the input past it. Default
            `DEFAULT_MAX_WORKING_PIXELS` (2 MP); None = always the full resolution.
        overlay: segments added by example ([`reme.reference.overlay`][reme.reference.overlay]), searched together
            with the reference set: an overlay folder (loaded when it exists, else created
            there by `save_overlay`), an [`Overlay`][reme.reference.overlay.Overlay], or None (an empty
            in-memory overlay; `add_examples` still works). An empty overlay changes nothing.
        example_bias: added to the cosine similarity of every overlay row in eq. 1 (candidate
            search and softmax), a prior that the user's examples match the images to segment
            better than the base does; in [0, 1]. 0 (default) = plain eq. 1 over base + overlay.
            Needs ``top_k`` (the streamed full softmax has no per-row bias).
        unlabelled: the "none of these" rule of `predict` (docs/method.md): True (default) =
            the chosen thresholds t_none and s_min
            ([`reme.inference.unlabelled`][reme.inference.unlabelled]); False = off (every pixel
            assigned, eqs. 1-3 as the paper writes them); a
            [`NoneRule`][reme.inference.unlabelled.NoneRule] or ``(t_none, s_min)`` pair (None
            switches one rule off). `segment_scores` (used by `reme eval`) is unaffected.
        view_cache_size: images whose proposals, S_test and dense features are kept (least
            recently used out), so `add_examples` right after `predict` on the same pixels, or
            predicting the same images again after the overlay changed, costs no encoder pass.
            Default 1; each kept 640 x 480 image takes a few MB.

    Raises:
        ReferenceSetError: the encoders do not match the reference set, or the overlay was made
            with other encoders than the reference set.
        ValueError: the overlay path is inside the reference folder, example_bias outside [0, 1]
            or without top_k; a logit scale that is not a finite number > 0, top_k < 1, an unknown
            retrieval, smooth_omega outside [0, 1), max_working_pixels < 1.
    """

    def __init__(self, reference: str | Path | ReferenceSet, *, visual_encoder=None, text_encoder=None,
                 felzenszwalb: FelzenszwalbParams | None = None,
                 segment_logit_scale: float = DEFAULT_SEGMENT_LOGIT_SCALE,
                 label_logit_scale: float = DEFAULT_LABEL_LOGIT_SCALE,
                 top_k: int | None = DEFAULT_TOP_K, templates: Sequence[str] | None = None,
                 allow_encoder_mismatch: bool = False, device: str | torch.device | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, retrieval: str = "exact",
                 proposals: str | None = None, n_clusters: int | None = None, smooth_omega: float = 0.0,
                 others_threshold: float | None = None,
                 max_working_pixels: int | None = DEFAULT_MAX_WORKING_PIXELS,
                 overlay: str | Path | Overlay | None = None, example_bias: float = 0.0,
                 view_cache_size: int = 1, unlabelled=True):
        self.device = resolve_device(device)
        self.none_rule = none_rules.resolve_rule(unlabelled)
        self.reference = reference if isinstance(reference, ReferenceSet) else load_reference(reference)
        man = self.reference.manifest
        enc = man.get("encoders", {})
        self.visual_encoder = self._encoder(visual_encoder, enc.get("visual"), "visual", allow_encoder_mismatch)
        self.text_encoder = self._encoder(text_encoder, enc.get("text"), "text", allow_encoder_mismatch)
        if self.visual_encoder.dim != self.reference.S_ref.shape[1]:
            raise ReferenceSetError(
                f"visual encoder {self.visual_encoder.spec} gives {self.visual_encoder.dim}-d features but "
                f"S_ref is {self.reference.S_ref.shape[1]}-d; use the encoder the reference was built with ({enc.get('visual')})"
            )
        if self.text_encoder.dim != self.reference.L_ref.shape[1]:
            raise ReferenceSetError(
                f"text encoder {self.text_encoder.spec} gives {self.text_encoder.dim}-d embeddings but "
                f"L_ref is {self.reference.L_ref.shape[1]}-d; use {enc.get('text')}"
            )
        fz = man.get("felzenszwalb")
        self.felzenszwalb = felzenszwalb or (FelzenszwalbParams(**fz) if fz else FelzenszwalbParams())
        self.segment_logit_scale = check_logit_scale(segment_logit_scale, "segment_logit_scale")
        self.label_logit_scale = check_logit_scale(label_logit_scale, "label_logit_scale")
        if max_working_pixels is not None and int(max_working_pixels) < 1:
            raise ValueError(f"max_working_pixels must be >= 1 or None, got {max_working_pixels}")
        self.max_working_pixels = None if max_working_pixels is None else int(max_working_pixels)
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        self.top_k = top_k
        self.templates = tuple(templates or man.get("templates") or TEMPLATES)
        self.chunk_size = int(chunk_size)
        if retrieval not in ("exact", "topk"):
            raise ValueError(f"retrieval must be 'exact' or 'topk', got {retrieval!r}")
        self.retrieval = retrieval
        if retrieval == "topk" and top_k is None:
            msg = (f"top_k=None asks for the paper's full softmax over all reference segments, but retrieval='topk' "
                   f"restricts eq. 1's softmax to the {DEFAULT_TOPK_CANDIDATES} FAISS candidates; use "
                   f"retrieval='exact' for the literal paper form")
            warnings.warn(msg, UserWarning, stacklevel=2)
        if not 0.0 <= smooth_omega < 1.0:
            raise ValueError(f"smooth_omega must lie in [0, 1), got {smooth_omega}")
        built = man.get("proposals") or {}
        method = proposals or built.get("method", "felzenszwalb")
        self.smooth_omega = float(smooth_omega)
        self.others_threshold = check_others_threshold(others_threshold)
        self.proposer = ProposalGenerator(method, felzenszwalb=self.felzenszwalb,
                                          n_clusters=n_clusters if n_clusters is not None else built.get("n_clusters", 8),
                                          sam_options=built.get("sam_options") if method == built.get("method") else None,
                                          device=self.device)
        # the CPU reads S_ref in its stored dtype (float16 memory map) block by block, no copy;
        # an accelerator gets one copy in the stored dtype
        S_ref = self.reference.S_ref
        self._S_ref = S_ref if self.device.type == "cpu" else torch.as_tensor(np.asarray(S_ref)).to(self.device)
        self._o_ref = o_ref_csr(self.reference.pair_segment, self.reference.pair_label,
                                self.reference.num_segments, self.reference.num_labels)
        self._shared_index: dict = {}  # the FAISS index, shared with `with_overlay` copies
        self._L_ref = torch.as_tensor(self.reference.L_ref, dtype=torch.float32, device=self.device)
        self._class_cache: dict[tuple, tuple[torch.Tensor, list[int]]] = {}
        self._a2_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        if not 0.0 <= float(example_bias) <= 1.0:
            raise ValueError(f"example_bias must lie in [0, 1], got {example_bias}")
        if example_bias and top_k is None:
            raise ValueError("example_bias needs top_k (the full softmax over all segments has no per-row bias)")
        self.example_bias = float(example_bias)
        self.view_cache_size = max(int(view_cache_size), 0)
        self._views: OrderedDict[tuple, tuple] = OrderedDict()  # pixels -> (Proposals, S_test, feats)
        self._views_lock = threading.Lock()                       # shared with `with_overlay` copies
        self._set_overlay(overlay)

    # ------------------------------------------------------------------ overlay (reme.reference.overlay)

    def _set_overlay(self, overlay) -> None:
        if overlay is None:
            ov = Overlay.empty(self.reference)
        elif isinstance(overlay, Overlay):
            ov = overlay
        else:
            path = check_overlay_path(overlay, self.reference.path)
            ov = load_overlay(path) if (path / "manifest.json").is_file() else Overlay.empty(self.reference)
            ov.path = path
        check_overlay(ov, self.reference)
        self.overlay = ov
        self._refresh_overlay()

    def _refresh_overlay(self) -> None:
        """Rebuild the merged retrieval tables after the overlay changed (cheap: the base is
        never copied; S_ref becomes a `StackedRows` view of base + overlay rows)."""
        ov = self.overlay
        if ov.num_rows == 0:
            self._merged = None
            return
        base = self.reference
        new = ov.new_labels(base.labels)
        ids = ov.label_ids(base.labels)
        n = base.num_labels + len(new)
        S_ov = ov.S if self.device.type == "cpu" else torch.as_tensor(ov.S).to(self.device)
        # the full softmax streams over base + overlay rows: a view on the CPU; on an accelerator
        # one concatenated copy, made only when that path runs (top-k merges two searches)
        S_all = StackedRows([self.reference.S_ref, ov.S]) if self.device.type == "cpu" else None
        L_new = (torch.as_tensor(np.stack([ov.label_embeddings[t] for t in new]), dtype=torch.float32, device=self.device)
                 if new else None)
        self._merged = _Merged(S_ov=S_ov, S_all=S_all, o_ref=concat_csr(self._o_ref, ids, n), row_labels=ids,
                               new_labels=new, L_new=L_new)

    def _with_new_labels(self, A2: torch.Tensor, L_test: torch.Tensor) -> torch.Tensor:
        """A2 of the base labels (unchanged by the overlay) followed by the rows of the
        overlay's new labels (eq. 2 is a softmax per label row, so adding rows changes no other)."""
        if self._merged is None or self._merged.L_new is None:
            return A2
        return torch.cat([A2, label_affinity(self._merged.L_new, L_test, self.label_logit_scale)])

    def with_overlay(self, overlay: str | Path | Overlay | None = None) -> "Segmenter":
        """A Segmenter sharing this one's encoders, reference set and caches (A2 of the base
        labels, the FAISS index, the cached image views, none of which depend on the overlay)
        but searching another overlay (one per demo session). None: a new empty overlay."""
        other = copy.copy(self)
        other._set_overlay(overlay)
        return other

    def examples(self) -> list[dict]:
        """The added examples, one record each ([`Overlay.examples`][reme.reference.overlay.Overlay.examples])."""
        return self.overlay.examples()

    def add_examples(self, image, mask_or_segment_ids, label, *, min_purity: float = 0.5,
                     image_name: str | None = None, save: bool = False) -> str:
        """Teach by example: add the segments of a region, with its label, to the overlay.

        The region's pieces are the proposals of ``image`` (the ones `predict` makes) whose
        majority covers at least ``min_purity`` of their area, as in GT mode
        ([`reme.proposals.majority_pieces`][reme.proposals.majority_pieces]); each piece
        becomes an S_ref row (mask average pooling, same encoder) with the label. A region
        smaller than every piece is added as one segment, its own mask pooled. The next
        `predict` uses them; nothing is trained.

        Args:
            image: as in `predict` (path, PIL, (H, W, 3) uint8 array, ``skimage:NAME``).
            mask_or_segment_ids: an (H, W) bool mask at the image's size; or ids of segments
                of ``predict(image).segment_ids`` (an int or a sequence of ints); or an
                (H, W) int label map whose value i means ``label[i]`` (< 0: unlabelled).
            label: the label (new text is embedded with the text encoder and the reference
                set's templates; an existing label reuses its L_ref row), or, with a label
                map, the list of names its values index.
            min_purity: in (0, 1], GT mode's majority fraction.
            image_name: name recorded as the rows' source image (default: the path, else
                ``"array:"`` + a hash of the pixels).
            save: also write the overlay to its folder (`save_overlay`).

        Returns:
            The example id (for `remove_examples`); "" when the mask selects nothing.

        Raises:
            ValueError: a mask of the wrong size, segment ids out of range, an empty label,
                a label map value without a name.
            reme.errors.ImageReadError: unreadable image.
        """
        if not 0.0 < float(min_purity) <= 1.0:
            raise ValueError(f"min_purity must lie in (0, 1], got {min_purity}")
        img, full_hw = load_image_bounded(image, max_pixels=self.max_working_pixels)
        props, S_test, feats = self._view(img)
        lm, names = self._example_label_map(mask_or_segment_ids, label, props, full_hw, img.shape[:2])
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
            S = self.visual_encoder.mask_embeddings(feats, masks, image=img).float().cpu().numpy()
            bbox, area = masks_bboxes(masks), masks.reshape(len(masks), -1).sum(1)
            labels = [names[v] for v in present]
        mask_boxes = masks_bboxes(np.stack([lm == names.index(x) for x in dict.fromkeys(labels)]))
        box_of = dict(zip(dict.fromkeys(labels), mask_boxes))
        sy, sx = full_hw[0] / img.shape[0], full_hw[1] / img.shape[1]
        scale = np.array([sx, sy, sx, sy])
        to_src = lambda b: np.round(np.asarray(b, np.float64) * scale).astype(np.int32)  # noqa: E731
        labels = [normalise_label(x) for x in labels]
        box_of = {normalise_label(k): v for k, v in box_of.items()}
        embeddings = self._label_rows([x for x in dict.fromkeys(labels) if x not in self.overlay.label_embeddings])
        eid = self.overlay.add(S, labels, image=image_name or _image_name(image, img), bbox=to_src(bbox),
                               area=np.round(np.asarray(area) * sx * sy).astype(np.int64),
                               mask_bbox=to_src(np.stack([box_of[x] for x in labels])), label_embeddings=embeddings)
        self._refresh_overlay()
        if save:
            self.save_overlay()
        return eid

    def _label_rows(self, labels: list[str]) -> dict[str, np.ndarray]:
        """L_ref rows for ``labels``: the base's row for a label it has (reused, so A2 of that
        label is unchanged), else the text encoder's template-ensembled embedding (docs/method.md step 5)."""
        have = {t: j for j, t in enumerate(self.reference.labels)}
        out = {t: np.asarray(self.reference.L_ref[have[t]], np.float32) for t in labels if t in have}
        new = [t for t in labels if t not in have]
        if new:
            out.update(zip(new, embed_labels(self.text_encoder, new, self.templates).astype(np.float32)))
        return out

    def _example_label_map(self, region, label, props, full_hw, work_hw) -> tuple[np.ndarray, list[str]]:
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

    def remove_examples(self, example_id: str | None = None, *, save: bool = False) -> int:
        """Undo: remove the segments of one example (None: the last added; "all": every one).

        Returns:
            How many segments were removed.

        Raises:
            KeyError: no example with that id.
        """
        n = self.overlay.clear() if example_id == "all" else self.overlay.remove(example_id)
        self._refresh_overlay()
        if save:
            self.save_overlay()
        return n

    def save_overlay(self, path: str | Path | None = None) -> Path:
        """Write the overlay to ``path`` (default: its folder) atomically
        ([`Overlay.save`][reme.reference.overlay.Overlay.save]).

        Raises:
            ValueError: no path, or a path inside the reference folder.
        """
        out = self.overlay.save(path, base_path=self.reference.path)
        self._refresh_overlay()  # the save merged other writers' rows (Overlay.save)
        return out

    def _view(self, img: np.ndarray):
        """(Proposals, S_test (k, d1) tensor, dense features) of a working-size image; the last
        ``view_cache_size`` images' are kept, so `add_examples` right after `predict` on the
        same pixels costs no encoder pass."""
        key = _pixels_key(img)
        with self._views_lock:
            hit = self._views.get(key)
            if hit is not None:
                self._views.move_to_end(key)
                return hit
        feats = self.visual_encoder.dense_features(img).to(self.device)
        props = self.proposer(img, feats)
        S_test = embed_proposals(self.visual_encoder, feats, props, img)
        if self.view_cache_size:
            with self._views_lock:
                self._views[key] = (props, S_test, feats)
                while len(self._views) > self.view_cache_size:
                    self._views.popitem(last=False)
        return props, S_test, feats

    def _encoder(self, given, manifest_spec, kind, allow_mismatch):
        if given is None:
            if not manifest_spec:
                raise ReferenceSetError(f"the reference manifest names no {kind} encoder; pass {kind}_encoder=")
            return resolve_encoder(manifest_spec, device=self.device)
        enc = resolve_encoder(given, device=self.device) if isinstance(given, str) else given
        if manifest_spec and enc.spec != manifest_spec and not allow_mismatch:
            raise ReferenceSetError(
                f"the reference set was built with {kind} encoder {manifest_spec!r}, not {enc.spec!r}; "
                f"use that encoder, or pass allow_encoder_mismatch=True (--allow-encoder-mismatch) if both are the same weights"
            )
        return enc

    def _class_embeddings(self, synonyms: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(tuple(s) for s in synonyms)
        if key not in self._class_cache:
            flat = [s for syns in synonyms for s in syns]
            owner = [ci for ci, syns in enumerate(synonyms) for _ in syns]
            L = embed_labels(self.text_encoder, flat, self.templates)
            if len(self._class_cache) > 16:
                self._class_cache.clear()
            self._class_cache[key] = (torch.as_tensor(L, device=self.device),
                                      torch.as_tensor(owner, dtype=torch.int64, device=self.device))
        return self._class_cache[key]

    def _class_affinity(self, synonyms: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A2 (n, c') float32 = softmax(tau2 L_ref L_test^T) of a class list (eq. 2) and the owner
        class of each of its c' names. A2 depends only on the class list and tau2, not on the
        image, so it is computed once per class list and kept for the last
        `A2_CACHE_SIZE` lists (least recently used out; n x c' x 4 bytes each)."""
        L_test, owner = self._class_embeddings(synonyms)
        key = (tuple(tuple(s) for s in synonyms), self.label_logit_scale)
        A2 = self._a2_cache.get(key)
        if A2 is None:
            A2 = label_affinity(self._L_ref, L_test, self.label_logit_scale)
            self._a2_cache[key] = A2
            while len(self._a2_cache) > A2_CACHE_SIZE:
                self._a2_cache.popitem(last=False)
        self._a2_cache.move_to_end(key)
        return self._with_new_labels(A2, L_test), owner

    @property
    def proposals(self) -> str:
        """The proposal method in use ("felzenszwalb", "cluster", "sam[:MODEL]")."""
        return self.proposer.method

    @property
    def n_clusters(self) -> int:
        """k of the "cluster" proposals."""
        return self.proposer.n_clusters

    @property
    def overlapping_proposals(self) -> bool:
        """True when proposals may overlap (SAM masks): eq. 3 then sums over masks."""
        return self.proposer.overlapping

    @torch.inference_mode()
    def segment_scores(self, image, classes, *, return_embeddings: bool = False,
                      return_masks: bool = False, return_none: bool = False) -> tuple:
        """Proposals and P_seg of one image (eqs. 1-2).

        Args:
            image: path, PIL image or (H, W, 3) uint8 RGB array.
            classes: class list or string
                ([`reme.classes.parse_classes`][reme.classes.parse_classes]).
            return_embeddings: append S_test, (k, d1) float32 tensor.
            return_masks: append the (k, H, W) bool proposal masks when they overlap (SAM),
                else None.
            return_none: compute P_seg with eq. 2's none column (the Segmenter's
                ``unlabelled`` rule) and append the none column (k,) and the nearest-neighbour
                cosine (k,), each None when its rule is off. P_seg's class columns then come
                from A2' (docs/method.md, "None of these").

        Returns:
            ``(segment_ids, P_seg, names)`` then the requested extras: segment_ids is an (H, W)
            int32 map indexing P_seg's k rows (with SAM: the smallest mask covering each
            pixel); P_seg is a (k, C) float32 tensor.
        """
        names, synonyms = parse_classes(classes)
        img = load_image(image)
        props, S_test, _ = self._view(img)
        seg, masks = props.segment_ids, props.masks
        A2, owner = self._class_affinity(synonyms)                                     # (n, c') eq. 2, cached
        rule = self.none_rule if return_none else none_rules.OFF
        if rule.label_threshold is not None:                                         # A2' (n, c' + 1)
            L_all = self._L_ref if self._merged is None or self._merged.L_new is None else \
                torch.cat([self._L_ref, self._merged.L_new])
            p_none = none_rules.none_share(L_all, self._class_embeddings(synonyms)[0], self.label_logit_scale,
                                           rule.label_threshold)
            A2 = none_rules.with_none_column(A2, p_none)
        P = self._segment_class_probs(S_test, A2)                                    # (k, c') eqs. 1-2
        none = nearest = None
        if rule.label_threshold is not None:
            P, none = P[:, :-1], P[:, -1]
        if rule.min_support is not None:
            nearest = none_rules.nearest_similarity(
                S_test, [self._S_ref] + ([self._merged.S_ov] if self._merged is not None else []), self.chunk_size)
        if len(owner) != len(names):  # synonyms of one class merged by max
            merged = torch.full((P.shape[0], len(names)), -float("inf"), device=P.device)
            P = merged.scatter_reduce(1, owner.expand(P.shape[0], -1), P, reduce="amax")
        if self.smooth_omega > 0:
            from reme.encoders.gfa import smooth_segment_probs

            P = smooth_segment_probs(P, seg, S_test, omega=self.smooth_omega).to(P.device)
        if self.others_threshold is not None:
            if "others" in (n.lower() for n in names):
                raise ValueError("'others' is reserved when others_threshold is set; rename that class")
            low = normalise_rows(P).max(dim=1).values < self.others_threshold
            others = torch.where(low, P.max(dim=1).values + 1.0, torch.zeros_like(low, dtype=P.dtype))
            P = torch.cat([P, others[:, None]], dim=1)
            names = names + ["others"]
        out = (seg, P, names)
        if return_embeddings:
            out += (S_test,)
        if return_masks:
            out += (masks,)
        if return_none:
            out += (none, nearest)
        return out

    def class_coverage(self, classes) -> list:
        """Per class its nearest labels in the searched reference set (base + overlay), their
        text cosine and segment counts, and whether one reaches t_none
        ([`reme.inference.unlabelled.class_coverage`][reme.inference.unlabelled.class_coverage])."""
        names, synonyms = parse_classes(classes)
        L_test, owner = self._class_embeddings(synonyms)
        ov = self._merged
        L_ref = self._L_ref if ov is None or ov.L_new is None else torch.cat([self._L_ref, ov.L_new])
        o_ref = self._o_ref if ov is None else ov.o_ref
        labels = list(self.reference.labels) + ([] if ov is None else ov.new_labels)
        return none_rules.class_coverage(names, L_test, owner, L_ref, labels,
                                         none_rules.label_segment_counts(o_ref.label, o_ref.num_labels),
                                         self.none_rule.label_threshold)

    @property
    def index(self):
        """The FAISS index of the top-k path: the reference set's ``index.faiss``, else one
        built in memory ([`reme.reference.index.build_index`][reme.reference.index.build_index]), moved to the GPU when
        faiss has one."""
        if "index" not in self._shared_index:
            from reme.reference.index import build_index, to_gpu

            index = self.reference.load_index()
            if index is None:
                logger.info("no saved FAISS index; building one over %d segments", self.reference.num_segments)
                index = build_index(self.reference.S_ref)
            self._shared_index["index"] = to_gpu(index)
        return self._shared_index["index"]

    def _segment_class_probs(self, S_test: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
        """P_seg (k, c') = A1 A2 by the configured retrieval (eq. 1 x eq. 2)."""
        tau, ov = self.segment_logit_scale, self._merged
        o_ref = self._o_ref if ov is None else ov.o_ref
        if self.retrieval == "topk" or self.top_k is not None:
            K = self.top_k or DEFAULT_TOPK_CANDIDATES
            if self.retrieval == "topk":
                from reme.reference.index import search

                _, ids = search(self.index, S_test.float().cpu().numpy(), K)          # base rows only
                sims = rescore(S_test, self._S_ref, ids)                              # exact re-scoring
                ids = torch.as_tensor(ids, device=sims.device)
            else:
                sims, ids = exact_topk(S_test, self._S_ref, K, chunk_size=self.chunk_size)
            if ov is not None:                                                        # + overlay rows, exact
                sims_o, ids_o = exact_topk(S_test, ov.S_ov, K, chunk_size=self.chunk_size)
                sims, ids = merge_topk(sims, ids, sims_o + self.example_bias, ids_o,
                                       offset=self.reference.num_segments, k=K)
            return topk_class_scores(sims, ids, o_ref, A2, logit_scale=tau)           # sparse A1 (k, n) x A2
        if ov is None:
            S_ref = self._S_ref
        else:
            if ov.S_all is None:
                ov.S_all = torch.cat([self._S_ref, ov.S_ov])
            S_ref = ov.S_all
        k, (n, c), m = S_test.shape[0], A2.shape, int(S_ref.shape[0])
        if n * k <= m * c:                                                           # A1 is the smaller
            A1 = streamed_label_affinity(S_test, S_ref, o_ref, logit_scale=tau, chunk_size=self.chunk_size)
            return A1 @ A2
        ps, pl = self.reference.pair_segment, self.reference.pair_label
        if ov is not None:
            ps = np.concatenate([ps, self.reference.num_segments + np.arange(len(ov.row_labels))])
            pl = np.concatenate([pl, ov.row_labels])
        B = reference_class_scores(ps, pl, A2, m)                                    # O_ref A2
        return segment_class_scores(S_test, S_ref, B, logit_scale=tau, chunk_size=self.chunk_size)

    def merged_reference(self) -> ReferenceSet:
        """The reference set `predict` searches: the base's rows and labels followed by the
        overlay's (the base itself when the overlay is empty). S_ref is a `StackedRows` view,
        not a copy; `concat_references([base, overlay.to_reference()])` holds the same rows."""
        if self._merged is None:
            return self.reference
        ref, ov = self.reference, self.overlay
        ids = self._merged.row_labels
        L_new = np.stack([ov.label_embeddings[t] for t in self._merged.new_labels]) if self._merged.new_labels else \
            np.zeros((0, ref.L_ref.shape[1]), np.float32)
        return ReferenceSet(
            S_ref=StackedRows([ref.S_ref, ov.S]), L_ref=np.concatenate([ref.L_ref, L_new]).astype(np.float32),
            pair_segment=np.concatenate([ref.pair_segment, ref.num_segments + np.arange(ov.num_rows)]),
            pair_label=np.concatenate([ref.pair_label, ids]), labels=list(ref.labels) + self._merged.new_labels,
            roots=list(ref.roots) + self._merged.new_labels, segment_image=list(ref.segment_image) + ov.images,
            segment_bbox=np.concatenate([ref.segment_bbox, ov.bbox]),
            segment_area=np.concatenate([ref.segment_area, ov.area]), manifest=ref.manifest,
            segment_source=list(ref.segment_source) + [EXAMPLE_SOURCE] * ov.num_rows, dropped=ref.dropped)

    def predict(self, image, classes, *, return_scores: bool = False,
                return_evidence: bool = False) -> SegmentationResult:
        """Segment one image into the given classes.

        An image over ``max_working_pixels`` is read at that working size (a file or lazily
        opened PIL JPEG is decoded at reduced size, never at full size), segmented there, and
        the maps are brought back to the input size (nearest for labels, bilinear for probs).

        Args:
            image: a file path, ``"skimage:NAME"``, a PIL image, or an (H, W, 3) / (H, W)
                uint8 RGB array (`reme.io.load_image`).
            classes: class names, a list or a comma-separated string; ``;`` separates
                synonyms within a class ("person; people"). The result names each class by
                its first synonym (``"floor; ground"`` -> ``"floor"``); the scores of the
                synonyms are merged by max.
            return_scores: also return the (H, W, C) P_test.
            return_evidence: also return, per test segment, the nearest reference segments
                behind its A1 row
                ([`reme.inference.evidence.retrieval_evidence`][reme.inference.evidence.retrieval_evidence], exact
                search; ``top_k`` of them, 10 when top_k is None). With ``retrieval="topk"`` on an
                approximate (IVF) index, the segments eq. 1 used can differ from these.

        Returns:
            [`SegmentationResult`][reme.inference.segmenter.SegmentationResult] (label_map (H, W) int32
            indexes ``classes``).

        Raises:
            reme.errors.ImageReadError: unreadable image, an array of the wrong shape or dtype,
                or an image over `reme.io.MAX_PIXELS` (also for a PIL image).
            reme.errors.ImageTypeError: ``image`` is none of the accepted kinds (bytes, None, a
                list, a tensor); a TypeError and an ImageReadError.
            ValueError: bad class list.
        """
        img, full_hw = load_image_bounded(image, max_pixels=self.max_working_pixels)
        seg, P, names, S_test, masks, none, nearest = self.segment_scores(img, classes, return_embeddings=True,
                                                                         return_masks=True, return_none=True)
        rule, C = self.none_rule, len(names)
        P_ext, unl = none_rules.extend_scores(P, none, nearest, rule) if rule.active else (P, None)
        evidence = None
        if return_evidence:
            from reme.inference.evidence import DEFAULT_EVIDENCE_TOP, retrieval_evidence

            # softmax support of eq. 1 as computed above; evidence itself is always an exact search
            support = self.top_k or (DEFAULT_TOPK_CANDIDATES if self.retrieval == "topk" else None)
            evidence = retrieval_evidence(S_test, self.merged_reference(), top=self.top_k or DEFAULT_EVIDENCE_TOP,
                                          top_k=support, logit_scale=self.segment_logit_scale,
                                          chunk_size=self.chunk_size)
        working_hw = tuple(int(x) for x in seg.shape)
        if masks is None:
            seg_label = none_rules.to_label_map(P_ext.argmax(dim=1).cpu().numpy(), C)
            probs = upsample_scores(pixel_class_scores(P, seg), full_hw) if return_scores else None
            seg = upsample_nearest(seg, full_hw)
            label_map = seg_label[seg]                                                # eq. 3 argmax
        else:                                                                         # eq. 3, overlapping masks
            P_test = pixel_class_scores_masks(P_ext.clamp_min(0), masks)
            label_map = upsample_nearest(none_rules.to_label_map(P_test.argmax(dim=2).cpu().numpy(), C), full_hw)
            seg = upsample_nearest(seg, full_hw)
            probs = upsample_scores(P_test[..., :C], full_hw) if return_scores else None
            del P_test
        extras, unl_frac, coverage = {"working_size": working_hw}, 0.0, None
        if rule.active:                                                               # "none of these"
            fractions, unl_frac = none_rules.label_fractions(label_map, C)
            nan = np.full(P.shape[0], np.nan, np.float32)
            extras.update(unlabelled_segments=unl.cpu().numpy(),
                          none_scores=nan if none is None else none.float().cpu().numpy(),
                          nearest_similarity=nan if nearest is None else nearest.float().cpu().numpy())
            coverage = self.class_coverage(classes) if rule.label_threshold is not None else None
        else:
            fractions = label_fractions(label_map, C)
        return SegmentationResult(label_map=label_map, classes=names, segment_ids=seg,
                                  segment_scores=P.cpu().numpy().astype(np.float32),
                                  class_fractions=fractions, scores=probs,
                                  extras=extras, evidence=evidence, unlabelled_fraction=unl_frac, coverage=coverage)


@dataclass
class _Merged:
    """Retrieval tables of base + overlay (`Segmenter._refresh_overlay`)."""

    S_ov: Any                 # (r, d1) overlay rows (array on CPU, tensor on an accelerator)
    S_all: Any                # (m + r, d1) StackedRows view (CPU), tensor or None (made when needed)
    o_ref: Any                # (m + r) x (n + n_new) ORefCSR
    row_labels: np.ndarray    # (r,) merged label id of each overlay row
    new_labels: list[str]     # the overlay's labels the base lacks (ids n, n + 1, ...)
    L_new: torch.Tensor | None  # (n_new, d2) their L_ref rows


def merge_topk(sims_a: torch.Tensor, ids_a: torch.Tensor, sims_b: torch.Tensor, ids_b: torch.Tensor, *,
               offset: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of two candidate lists per row: (k_q, t_a) and (k_q, t_b) similarities and row ids,
    the second's ids shifted by ``offset`` (rows of a second table stacked after the first).
    Returns (k_q, min(k, t_a + t_b)) similarities, descending, and int64 ids."""
    sims = torch.cat([sims_a, sims_b.to(sims_a.device)], 1)
    ids = torch.cat([ids_a.to(torch.int64), ids_b.to(ids_a.device, torch.int64) + offset], 1)
    vals, order = torch.topk(sims, min(k, sims.shape[1]), dim=1)
    return vals, torch.gather(ids, 1, order)


def _pixels_key(img: np.ndarray) -> tuple:
    """Identity of an image's pixels (shape + BLAKE2 of the bytes; ~2 ms per megapixel)."""
    import hashlib

    return img.shape, hashlib.blake2b(np.ascontiguousarray(img).data, digest_size=16).digest()


def _image_name(image, img: np.ndarray) -> str:
    """What an added example records as its source image."""
    if isinstance(image, (str, Path)):
        return str(image)
    return "array:" + _pixels_key(img)[1].hex()[:12]


def upsample_nearest(a: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) by nearest neighbour (pixel centres: source row
    ``floor((i + 0.5) h / H)``); ``a`` itself when the size already matches. Allocates only the
    output (broadcast fancy indexing)."""
    (h, w), (H, W) = a.shape[:2], size_hw
    if (h, w) == (H, W):
        return a
    rows = np.minimum(((np.arange(H) + 0.5) * (h / H)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * (w / W)).astype(np.int64), w - 1)
    return a[rows[:, None], cols[None, :]]


def upsample_scores(p: torch.Tensor, size_hw: tuple[int, int]) -> np.ndarray:
    """(h, w, C) tensor -> (H, W, C) float32 array, bilinear (``align_corners=False``)."""
    if tuple(p.shape[:2]) == tuple(size_hw):
        return p.float().cpu().numpy()
    x = p.float().permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x, size=tuple(size_hw), mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).contiguous().cpu().numpy()


def label_fractions(label_map: np.ndarray, n: int, rows: int = 1024) -> np.ndarray:
    """(n,) float64 fraction of the pixels of an (H, W) int label map with each value 0..n-1;
    counted ``rows`` rows at a time (no int64 copy of a large map)."""
    counts = np.zeros(n, np.int64)
    for r in range(0, label_map.shape[0], rows):
        counts += np.bincount(label_map[r:r + rows].ravel(), minlength=n)[:n]
    return counts / max(label_map.size, 1)
