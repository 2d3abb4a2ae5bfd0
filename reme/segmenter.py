"""``Segmenter``: open-vocabulary semantic segmentation of one image by retrieval
(METHOD.md Part 2)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from reme.classes import parse_classes
from reme.encoders import resolve_device, resolve_encoder
from reme.errors import ReferenceSetError
from reme.io import load_image
from reme.pooling import mask_average_pool
from reme.proposals import FelzenszwalbParams, felzenszwalb_segments
from reme.reference import ReferenceSet, load_reference
from reme.retrieval import (
    label_affinity,
    pixel_class_probs,
    reference_class_scores,
    segment_class_probs,
)
from reme.text_embedding import TEMPLATES, embed_labels

logger = logging.getLogger(__name__)

#: Defaults chosen by us on CamVid train->val (GT reference of 68k segments, classical encoder,
#: 30 val images; docs/method.md "Choosing the logit scales"): paper form (1, 1, all) 2.9 mIoU
#: (majority class everywhere), scale 100 over all segments 30.2, top-k 5-10 at scale 50-100
#: 43.0-43.7. The literal paper form is segment_logit_scale=1, label_logit_scale=1, top_k=None.
DEFAULT_SEGMENT_LOGIT_SCALE = 50.0
DEFAULT_LABEL_LOGIT_SCALE = 50.0
DEFAULT_TOP_K: int | None = 10


@dataclass
class SegmentationResult:
    """Output of :meth:`Segmenter.predict`.

    Attributes:
        label_map: (H, W) int32, index into ``classes`` of each pixel.
        classes: the C class display names, in the order given.
        segment_ids: (H, W) int32 proposal id of each pixel (0..k-1).
        segment_probs: (k, C) float32 P_seg (rows need not sum to 1).
        class_fractions: (C,) float64 fraction of pixels assigned to each class.
        probs: (H, W, C) float32 P_test, only with ``return_probs=True`` (else None).
    """

    label_map: np.ndarray
    classes: list[str]
    segment_ids: np.ndarray
    segment_probs: np.ndarray
    class_fractions: np.ndarray
    probs: np.ndarray | None = None
    extras: dict = field(default_factory=dict)


class Segmenter:
    """Training-free open-vocabulary segmenter (ReME inference, METHOD.md Part 2).

    Args:
        reference: a reference folder path or a loaded :class:`ReferenceSet`.
        visual_encoder: spec of the visual encoder (``reme.encoders.resolve_encoder``) or an
            encoder object; None = the one the reference set was built with (manifest).
        text_encoder: spec or object for L_test; None = the manifest's.
        felzenszwalb: proposal settings; None = the manifest's (else FreeDA's 100/1.0/20).
        segment_logit_scale: tau1 of eq. 1's softmax (paper form: 1.0). Default 50, chosen by
            us (module constants, measured on CamVid).
        label_logit_scale: tau2 of eq. 2's softmax (paper form: 1.0). Default 50, chosen by us.
        top_k: restrict eq. 1's softmax to the top_k nearest reference segments; None = all
            (paper form). Default 10, chosen by us.
        templates: prompt templates for class names; None = the manifest's (METHOD step 5).
        allow_encoder_mismatch: use encoders whose spec differs from the manifest's (same
            dimension still required); for local copies of the same weights.
        device: "cpu", "cuda", ... or None (CUDA if available).
        chunk_size: reference rows per block in eq. 1 (memory vs speed).

    Raises:
        ReferenceSetError: the encoders do not match the reference set.
    """

    def __init__(self, reference: str | Path | ReferenceSet, *, visual_encoder=None, text_encoder=None,
                 felzenszwalb: FelzenszwalbParams | None = None,
                 segment_logit_scale: float = DEFAULT_SEGMENT_LOGIT_SCALE,
                 label_logit_scale: float = DEFAULT_LABEL_LOGIT_SCALE,
                 top_k: int | None = DEFAULT_TOP_K, templates: Sequence[str] | None = None,
                 allow_encoder_mismatch: bool = False, device: str | torch.device | None = None,
                 chunk_size: int = 65536):
        self.device = resolve_device(device)
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
        self.segment_logit_scale = float(segment_logit_scale)
        self.label_logit_scale = float(label_logit_scale)
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        self.top_k = top_k
        self.templates = tuple(templates or man.get("templates") or TEMPLATES)
        self.chunk_size = int(chunk_size)
        S_ref = np.asarray(self.reference.S_ref)
        # float32 on the CPU (fast matmul); stored dtype (float16 halves memory) on an accelerator
        S_ref = S_ref.astype(np.float32) if self.device.type == "cpu" else S_ref
        self._S_ref = torch.as_tensor(S_ref if S_ref.flags.writeable else S_ref.copy()).to(self.device)
        self._L_ref = torch.as_tensor(self.reference.L_ref, dtype=torch.float32, device=self.device)
        self._class_cache: dict[tuple, tuple[torch.Tensor, list[int]]] = {}

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

    @torch.inference_mode()
    def segment_probs(self, image, classes) -> tuple[np.ndarray, torch.Tensor, list[str]]:
        """Proposals and P_seg of one image.

        Returns:
            ``(segment_ids, P_seg, names)``: (H, W) int32 ids, (k, C) float32 tensor, class names.
        """
        names, synonyms = parse_classes(classes)
        img = load_image(image)
        seg = felzenszwalb_segments(img, self.felzenszwalb)
        feats = self.visual_encoder.dense_features(img)
        S_test = mask_average_pool(feats.to(self.device), seg)
        L_test, owner = self._class_embeddings(synonyms)
        A2 = label_affinity(self._L_ref, L_test, self.label_logit_scale)              # (n, c') eq. 2
        B = reference_class_scores(self.reference.pair_segment, self.reference.pair_label, A2,
                                   self.reference.num_segments)                      # O_ref A2
        P = segment_class_probs(S_test, self._S_ref, B.to(self.device), logit_scale=self.segment_logit_scale,
                                top_k=self.top_k, chunk_size=self.chunk_size)         # (k, c') eqs. 1-2
        if len(owner) != len(names):  # synonyms of one class merged by max
            merged = torch.full((P.shape[0], len(names)), -float("inf"), device=P.device)
            P = merged.scatter_reduce(1, owner.expand(P.shape[0], -1), P, reduce="amax")
        return seg, P, names

    def predict(self, image, classes, *, return_probs: bool = False) -> SegmentationResult:
        """Segment one image into the given classes.

        Args:
            image: path, PIL image or (H, W, 3) uint8 RGB array.
            classes: class names, a list or a comma-separated string; ``;`` separates
                synonyms within a class ("person; people").
            return_probs: also return the (H, W, C) P_test.

        Returns:
            :class:`SegmentationResult` (label_map (H, W) int32 indexes ``classes``).

        Raises:
            reme.errors.ImageReadError: unreadable image. ValueError: bad class list.
        """
        seg, P, names = self.segment_probs(image, classes)
        seg_label = P.argmax(dim=1).cpu().numpy().astype(np.int32)
        label_map = seg_label[seg]                                                    # eq. 3 argmax
        probs = pixel_class_probs(P, seg).cpu().numpy() if return_probs else None
        frac = np.bincount(label_map.ravel(), minlength=len(names)) / label_map.size
        return SegmentationResult(label_map=label_map, classes=names, segment_ids=seg,
                                  segment_probs=P.cpu().numpy().astype(np.float32),
                                  class_fractions=frac, probs=probs)
