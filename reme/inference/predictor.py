"""``Predictor``: the stateless half of inference (docs/method.md Part 2): reference set, encoders
and settings in, numpy records out. The overlay of examples is edited elsewhere
([`reme.inference.editor.OverlayEditor`][reme.inference.editor.OverlayEditor]) and passed in as
[`OverlayTables`][reme.inference.records.OverlayTables]; [`reme.inference.segmenter.Segmenter`][reme.inference.segmenter.Segmenter]
joins the two behind one object.

A Predictor's settings are fixed at construction; what it keeps between calls are caches of
values that depend only on their key (A2 per class list, class embeddings, proposals and S_test
per image, the FAISS index), each a ``cachetools`` cache behind its own lock, so one Predictor
serves several threads at once and changes no process-wide state (thread counts included).
"""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from reme.checks import check_logit_scale, check_others_threshold
from reme.classes import parse_classes
from reme.defaults import PROPOSAL_PIXELS
from reme.encoders import resolve_device, resolve_encoder
from reme.encoders.pooling import embed_proposals
from reme.encoders.text import TEMPLATES, embed_labels
from reme.errors import ReferenceSetError
from reme.inference import unlabelled as none_rules
from reme.inference.caches import LockedLRU
from reme.inference.evidence import DEFAULT_EVIDENCE_TOP, evidence_from_neighbours, neighbour_evidence
from reme.inference.kernel import DEFAULT_CHUNK_SIZE, TopkReducer, scan
from reme.inference.maps import label_fractions, upsample_nearest, upsample_scores
from reme.inference.records import OverlayTables, SegmentationResult
from reme.inference.retrieval import (
    DEFAULT_TOPK_CANDIDATES,
    a1_reducer,
    class_score_reducer,
    label_affinity,
    merge_synonyms,
    normalise_rows,
    pixel_class_scores,
    pixel_class_scores_masks,
    reference_class_scores,
    rescore,
    topk_class_scores,
)
from reme.reference.oref import o_ref_csr
from reme.io import load_image, load_image_bounded, pixels_key
from reme.proposals import FelzenszwalbParams, ProposalGenerator
from reme.reference import ReferenceSet, load_reference

logger = logging.getLogger(__name__)

#: Defaults chosen by us on CamVid train->val (GT reference of 68k segments, classical encoder,
#: 30 val images; docs/method.md "Choosing the logit scales"): paper form (1, 1, all) 2.9 mIoU
#: (majority class everywhere), scale 100 over all segments 30.2, top-k 5-10 at scale 50-100
#: 43.0-43.7. The literal paper form is segment_logit_scale=1, label_logit_scale=1, top_k=None
#: (with unlabelled=False and full-size proposals, proposal_pixels=None).
DEFAULT_SEGMENT_LOGIT_SCALE = 50.0
DEFAULT_LABEL_LOGIT_SCALE = 50.0
DEFAULT_TOP_K: int | None = 10
#: Working resolution of `predict`: larger inputs are segmented (proposals, encoder, pooling) at
#: this many pixels (aspect ratio kept, bilinear; a JPEG is decoded at reduced size) and the
#: label map is brought back to the input size (nearest; ``scores`` bilinear). 2 MP: a 2048 x
#: 1024 Cityscapes frame and every benchmark image fit unchanged. Peak memory is then flat in
#: the input size past it (docs/performance.md, "Large photos").
DEFAULT_MAX_WORKING_PIXELS = 2048 * 1024
#: Felzenszwalb's working size at inference, in pixels (``proposal_pixels``; `reme.defaults`
#: holds the value so the CLI can show it without torch); None = the image's working size.
#: Chosen on CamVid train frames (docs/performance.md "Proposals at a reduced working size").
DEFAULT_PROPOSAL_PIXELS: int | None = PROPOSAL_PIXELS
#: Class lists whose A2 (eq. 2) a Predictor keeps (least recently used out); our choice.
A2_CACHE_SIZE = 4
#: Class lists whose text embeddings a Predictor keeps; our choice.
CLASS_CACHE_SIZE = 16


class Predictor:
    """Stateless ReME inference: reference set + encoders + settings in, numpy records out.

    Every knob is a constructor argument; the defaults are the module constants (chosen by us,
    measured on CamVid, docs/method.md).

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
        segment_logit_scale: tau1 of eq. 1's softmax (paper form: 1.0). Default 50.
        label_logit_scale: tau2 of eq. 2's softmax (paper form: 1.0). Default 50.
        top_k: restrict eq. 1's softmax to the top_k nearest reference segments; None = all
            (paper form). Default 10.
        templates: prompt templates for class names; None = the manifest's (method step 5).
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
            (method step 1), "cluster" (Split Matching's k-means over the visual encoder's dense
            features, [`reme.proposals.cluster`][reme.proposals.cluster]), or "sam" / "sam:MODEL"
            (SAM automatic masks, [`reme.proposals.sam`][reme.proposals.sam]). None (default) = the
            method the reference set was built with (manifest), else "felzenszwalb". SAM's masks
            overlap: each is pooled on its own and eq. 3 sums P_seg over the masks covering a pixel
            ([`reme.inference.retrieval.pixel_class_scores_masks`][reme.inference.retrieval.pixel_class_scores_masks]);
            ``segment_ids`` then shows the smallest mask covering each pixel.
        n_clusters: k of the "cluster" proposals; None = the manifest's, else 8.
        smooth_omega: in [0, 1); > 0 smooths P_seg over the test image's segment adjacency
            graph with the GFA random walk of OVSNet
            ([`reme.encoders.gfa.smooth_segment_probs`][reme.encoders.gfa.smooth_segment_probs]). 0 (default) = off.
        others_threshold: when set, a segment whose normalised confidence (max of its P_seg row
            divided by the row sum, in [1/C, 1]) is below it is labelled "others", an extra
            class appended to ``classes`` (OpenBench). None (default) = off.
        max_working_pixels: larger images are segmented at this many pixels (aspect ratio
            kept) and the maps brought back to the input size. Default
            `DEFAULT_MAX_WORKING_PIXELS` (2 MP); None = always the full resolution.
        example_bias: in [0, 1], added to the cosine similarity of every overlay row in eq. 1
            (candidate search and softmax). 0 (default) = plain eq. 1 over base + overlay.
            Needs ``top_k``.
        view_cache_size: images whose proposals, S_test and dense features are kept (least
            recently used out). Default 1; each kept 640 x 480 image takes a few MB.
        unlabelled: the "none of these" rule of `predict` (docs/method.md): True (default) =
            the chosen thresholds t_none and s_min
            ([`reme.inference.unlabelled`][reme.inference.unlabelled]); False = off (every pixel
            assigned, eqs. 1-3 as the paper writes them); a
            [`NoneRule`][reme.inference.unlabelled.NoneRule] or ``(t_none, s_min)`` pair (None
            switches one rule off). `segment_scores` (used by `reme eval`) is unaffected unless
            asked (``return_none``). Read back as ``none_rule``.
        proposal_pixels: Felzenszwalb proposals of an image over this many pixels are made at
            about this size (parameters scaled, ids brought back by nearest neighbour;
            [`felzenszwalb_segments`][reme.proposals.felzenszwalb_segments]); the encoder and
            the label maps keep the working size. Default `DEFAULT_PROPOSAL_PIXELS`; None = the
            working size itself. Read back as ``proposer.max_pixels``.

    Raises:
        ReferenceSetError: the encoders do not match the reference set.
        ValueError: a logit scale that is not a finite number in (0, 1000], top_k < 1, an unknown
            retrieval, smooth_omega outside [0, 1), max_working_pixels < 1, example_bias outside
            [0, 1] or without top_k, a negative or non-finite others_threshold, an unlabelled
            threshold outside [-1, 1], proposal_pixels < 1.
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
                 max_working_pixels: int | None = DEFAULT_MAX_WORKING_PIXELS, example_bias: float = 0.0,
                 view_cache_size: int = 1, unlabelled=True,
                 proposal_pixels: int | None = DEFAULT_PROPOSAL_PIXELS):
        self.none_rule = none_rules.resolve_rule(unlabelled)
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
        self.segment_logit_scale = check_logit_scale(segment_logit_scale, "segment_logit_scale")
        self.label_logit_scale = check_logit_scale(label_logit_scale, "label_logit_scale")
        if max_working_pixels is not None and int(max_working_pixels) < 1:
            raise ValueError(f"max_working_pixels must be >= 1 or None, got {max_working_pixels}")
        self.max_working_pixels = None if max_working_pixels is None else int(max_working_pixels)
        if proposal_pixels is not None and int(proposal_pixels) < 1:
            raise ValueError(f"proposal_pixels must be >= 1 or None, got {proposal_pixels}")
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
            warnings.warn(msg, UserWarning, stacklevel=3)
        if not 0.0 <= smooth_omega < 1.0:
            raise ValueError(f"smooth_omega must lie in [0, 1), got {smooth_omega}")
        built = man.get("proposals") or {}
        method = proposals or built.get("method", "felzenszwalb")
        self.smooth_omega = float(smooth_omega)
        self.others_threshold = check_others_threshold(others_threshold)
        self.proposer = ProposalGenerator(method, felzenszwalb=self.felzenszwalb,
                                          n_clusters=n_clusters if n_clusters is not None else built.get("n_clusters", 8),
                                          sam_options=built.get("sam_options") if method == built.get("method") else None,
                                          device=self.device, max_pixels=proposal_pixels)
        if not 0.0 <= float(example_bias) <= 1.0:
            raise ValueError(f"example_bias must lie in [0, 1], got {example_bias}")
        if example_bias and top_k is None:
            raise ValueError("example_bias needs top_k (the full softmax over all segments has no per-row bias)")
        self.example_bias = float(example_bias)
        self.view_cache_size = max(int(view_cache_size), 0)
        # the CPU reads S_ref in its stored dtype (float16 memory map) block by block, no copy;
        # an accelerator gets one copy in the stored dtype
        S_ref = self.reference.S_ref
        self.S_ref = S_ref if self.device.type == "cpu" else torch.as_tensor(np.asarray(S_ref)).to(self.device)
        self.o_ref = o_ref_csr(self.reference.pair_segment, self.reference.pair_label,
                               self.reference.num_segments, self.reference.num_labels)
        self.L_ref = torch.as_tensor(self.reference.L_ref, dtype=torch.float32, device=self.device)
        self.view_cache = LockedLRU(self.view_cache_size)          # pixels -> (Proposals, S_test, feats)
        self.a2_cache = LockedLRU(A2_CACHE_SIZE)                     # (class list, tau2) -> A2
        self.list_cache = LockedLRU(2 * A2_CACHE_SIZE)             # (what, class list, ...) -> none share, coverage
        self.class_cache = LockedLRU(CLASS_CACHE_SIZE)             # class list -> (L_test, owner)
        self._index_lock = threading.Lock()
        self._index = None

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

    # ------------------------------------------------------------------ cached, key-only values

    def view(self, img: np.ndarray):
        """(Proposals, S_test (k, d1) float32 tensor, dense features) of a working-size (h, w, 3)
        uint8 image; the last ``view_cache_size`` images' are kept (keyed by
        `reme.io.pixels_key`)."""
        def make():
            feats = self.visual_encoder.dense_features(img).to(self.device)
            props = self.proposer(img, feats)
            return props, embed_proposals(self.visual_encoder, feats, props, img), feats

        return self.view_cache.get_or_make((pixels_key(img), self.proposer.settings_key), make)

    def class_embeddings(self, synonyms: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_test (c', d2) float32 tensor of every class string, owner (c',) int64 class index)."""
        def make():
            flat = [s for syns in synonyms for s in syns]
            owner = [ci for ci, syns in enumerate(synonyms) for _ in syns]
            L = embed_labels(self.text_encoder, flat, self.templates)
            return (torch.as_tensor(L, device=self.device), torch.as_tensor(owner, dtype=torch.int64, device=self.device))

        return self.class_cache.get_or_make(tuple(tuple(s) for s in synonyms), make)

    def class_affinity(self, synonyms: list[list[str]], tables: OverlayTables | None = None):
        """A2 (n [+ n_new], c') float32 = softmax(tau2 L_ref L_test^T) of a class list (eq. 2) and
        the owner class of each of its c' names. A2 of the base labels depends only on the class
        list and tau2, so it is kept for the last `A2_CACHE_SIZE` lists; the rows of an overlay's
        new labels follow (eq. 2 is a softmax per label row, so added rows change no other)."""
        L_test, owner = self.class_embeddings(synonyms)
        key = (tuple(tuple(s) for s in synonyms), self.label_logit_scale)
        A2 = self.a2_cache.get_or_make(key, lambda: label_affinity(self.L_ref, L_test, self.label_logit_scale))
        if tables is not None and tables.L_new is not None:
            A2 = torch.cat([A2, label_affinity(tables.L_new, L_test, self.label_logit_scale)])
        return A2, owner

    @property
    def index(self):
        """The FAISS index of the top-k path: the reference set's ``index.faiss``, else one
        built in memory ([`reme.reference.index.build_index`][reme.reference.index.build_index]), moved to the GPU when
        faiss has one."""
        with self._index_lock:
            if self._index is None:
                from reme.reference.index import build_index, to_gpu

                index = self.reference.load_index()
                if index is None:
                    logger.info("no saved FAISS index; building one over %d segments", self.reference.num_segments)
                    index = build_index(self.reference.S_ref)
                self._index = to_gpu(index)
            return self._index

    # ------------------------------------------------------------------ eq. 1 through the kernel

    def class_scores(self, S_test: torch.Tensor, A2: torch.Tensor, tables: OverlayTables | None = None, *,
                     evidence_top: int | None = None, nearest: bool = False):
        """``(P_seg, evidence, nearest)``: P_seg (k, c') = A1 A2 by the configured retrieval
        (eqs. 1-2); with ``evidence_top`` the nearest reference segments of each test segment from
        the same pass of [`reme.inference.kernel.scan`][reme.inference.kernel.scan] (None without;
        on the FAISS path an exact pass of its own,
        [`retrieval_evidence`][reme.inference.evidence.retrieval_evidence]); with ``nearest`` the
        (k,) float32 cosine of each test segment's nearest base or overlay row ("none of these"
        support rule), read off the exact top-k heaps when they ran (else an exact top-1 pass,
        [`nearest_similarity`][reme.inference.unlabelled.nearest_similarity]; same values), else None."""
        tau = self.segment_logit_scale
        o_ref = self.o_ref if tables is None else tables.o_ref
        m = self.reference.num_segments
        ev = near = None
        if self.retrieval == "topk" or self.top_k is not None:
            K = self.top_k or DEFAULT_TOPK_CANDIDATES
            want = max(evidence_top or 0, K)
            heap = TopkReducer(K)
            ev_heap = None if evidence_top is None or self.retrieval == "topk" else (
                heap if want == K and not (tables is not None and self.example_bias) else TopkReducer(want))
            if self.retrieval == "topk":
                from reme.reference.index import search

                _, ids = search(self.index, S_test.float().cpu().numpy(), K)          # base rows only
                sims = rescore(S_test, self.S_ref, ids)                               # exact re-scoring
                heap.seed(sims, torch.as_tensor(ids, device=sims.device))
                if nearest:                                   # FAISS candidates may miss it: exact pass
                    near = none_rules.nearest_similarity(S_test, [self.S_ref], self.chunk_size)
            else:
                scan(S_test, self.S_ref, [heap] + ([ev_heap] if ev_heap not in (None, heap) else []),
                     chunk_size=self.chunk_size)
                if nearest:                                   # the base heap's top-1, before the merge
                    near = none_rules.top1(heap.finish()[0])
            if tables is not None:                                                    # + overlay rows, exact
                ov_heap = TopkReducer(K)
                ov_ev = None if ev_heap in (None, heap) else TopkReducer(want)
                scan(S_test, tables.S_ov, [ov_heap] + ([ov_ev] if ov_ev else []), chunk_size=self.chunk_size)
                sims_o, ids_o = ov_heap.finish()
                if nearest:                                   # unbiased overlay top-1
                    near = torch.maximum(near, none_rules.top1(sims_o))
                heap.add_candidates(sims_o + self.example_bias, ids_o, offset=m)
                if ov_ev is not None:
                    ev_heap.add_candidates(*ov_ev.finish(), offset=m)
            sims, ids = heap.finish()
            if ev_heap is not None:
                ev = evidence_from_neighbours(*ev_heap.finish(), o_ref, self._labels(tables), top=evidence_top,
                                              top_k=K, logit_scale=tau)
            elif evidence_top is not None:                                           # FAISS: an exact pass
                ev = self._exact_evidence(S_test, tables, evidence_top, K)
            return topk_class_scores(sims, ids, o_ref, A2, logit_scale=tau), ev, near  # sparse A1 (k, n) x A2
        if nearest:                                                                   # full softmax: own pass
            near = none_rules.nearest_similarity(S_test, [self.S_ref] + ([] if tables is None else [tables.S_ov]),
                                                 self.chunk_size)
        S_ref = self.S_ref if tables is None else self._stacked(tables)
        k, (n, c), m_all = S_test.shape[0], A2.shape, int(S_ref.shape[0])
        if k == 0 or m_all == 0:
            P = torch.zeros(k, c, device=A2.device)
            return P, (None if evidence_top is None else self._exact_evidence(S_test, tables, evidence_top, None)), near
        if n * k <= m_all * c:                                                        # A1 is the smaller
            soft = a1_reducer(o_ref, k, S_test.device, tau)
        else:
            ps, pl = self.reference.pair_segment, self.reference.pair_label
            if tables is not None:
                ps = np.concatenate([ps, m + np.arange(len(tables.row_labels))])
                pl = np.concatenate([pl, tables.row_labels])
            soft = class_score_reducer(reference_class_scores(ps, pl, A2, m_all), k, tau)   # O_ref A2
        ev_heap = None if evidence_top is None else TopkReducer(min(evidence_top, m_all))
        scan(S_test, S_ref, [soft] + ([ev_heap] if ev_heap else []), chunk_size=self.chunk_size)
        P = soft.finish().T
        if n * k <= m_all * c:
            P = P @ A2
        if ev_heap is not None:
            ev = evidence_from_neighbours(*ev_heap.finish(), o_ref, self._labels(tables), top=evidence_top,
                                          logit_scale=tau, log_normaliser=soft.log_normaliser())
        return P, ev, near

    def _stacked(self, tables: OverlayTables):
        if tables.S_all is None:                      # accelerator: one concatenated copy, when needed
            tables.S_all = torch.cat([self.S_ref, tables.S_ov])
        return tables.S_all

    def _labels(self, tables: OverlayTables | None) -> list[str]:
        return list(self.reference.labels) + ([] if tables is None else tables.new_labels)

    def _exact_evidence(self, S_test, tables, top: int, support: int | None):
        S_all = self.S_ref if tables is None else self._stacked(tables)
        return neighbour_evidence(S_test, S_all, self.o_ref if tables is None else tables.o_ref, self._labels(tables),
                                  top=top, top_k=support, logit_scale=self.segment_logit_scale,
                                  chunk_size=self.chunk_size)

    # ------------------------------------------------------------------ the public calls

    @torch.inference_mode()
    def segment_scores(self, image, classes, *, tables: OverlayTables | None = None, return_embeddings: bool = False,
                       return_masks: bool = False, return_none: bool = False,
                       evidence_top: int | None = None) -> tuple:
        """Proposals and P_seg of one image (eqs. 1-2), as torch tensors.

        The one call that returns tensors (on the predictor's device): the evaluation protocol
        (`reme.eval.protocol`) continues on them; `predict` returns numpy records.

        Args:
            image: path, PIL image or (H, W, 3) uint8 RGB array (read at full size; `predict`
                reads at the working size).
            classes: class list or string ([`reme.classes.parse_classes`][reme.classes.parse_classes]).
            tables: the overlay's retrieval tables, or None for the base alone.
            return_embeddings: append S_test, (k, d1) float32 tensor.
            return_masks: append the (k, H, W) bool proposal masks when they overlap (SAM), else None.
            return_none: compute P_seg with eq. 2's none column (the ``unlabelled`` rule) and
                append the none column (k,) and the nearest-neighbour cosine (k,), each None
                when its rule is off. P_seg's class columns then come from A2' (docs/method.md,
                "None of these").
            evidence_top: append the evidence with this many neighbours per segment (None: not).

        Returns:
            ``(segment_ids, P_seg, names)`` then the requested extras, in the order above:
            segment_ids is an (H, W) int32 numpy map indexing P_seg's k rows (with SAM: the
            smallest mask covering each pixel); P_seg is a (k, C) float32 tensor.

        Raises:
            ValueError: bad class list, or a class named "others" with ``others_threshold`` set.
            reme.errors.ImageReadError: unreadable image.
        """
        rule = self.none_rule if return_none else none_rules.OFF
        seg, P, names, S_test, masks, ev, none, nearest = self._segment_scores(load_image(image), classes, tables,
                                                                               evidence_top, rule)
        res = (seg, P, names)
        if return_embeddings:
            res += (S_test,)
        if return_masks:
            res += (masks,)
        if return_none:
            res += (none, nearest)
        if evidence_top is not None:
            res += (ev,)
        return res

    def _segment_scores(self, img: np.ndarray, classes, tables, evidence_top, rule=none_rules.OFF):
        names, synonyms = parse_classes(classes)
        props, S_test, _ = self.view(img)
        seg, masks = props.segment_ids, props.masks
        A2, owner = self.class_affinity(synonyms, tables)                                # (n, c') eq. 2, cached
        if rule.label_threshold is not None:                                             # A2' (n, c' + 1)
            p_none = self._per_class_list(
                tables, ("none share", tuple(map(tuple, synonyms)), self.label_logit_scale, rule.label_threshold),
                lambda: none_rules.none_share(self._L_all(tables), self.class_embeddings(synonyms)[0],
                                              self.label_logit_scale, rule.label_threshold))
            A2 = none_rules.with_none_column(A2, p_none)
        P, ev, nearest = self.class_scores(S_test, A2, tables, evidence_top=evidence_top,
                                           nearest=rule.min_support is not None)         # (k, c') eqs. 1-2
        none = None
        if rule.label_threshold is not None:
            P, none = P[:, :-1], P[:, -1]
        if len(owner) != len(names):  # synonyms of one class merged by max
            P = merge_synonyms(P, owner, len(names))
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
        return seg, P, names, S_test, masks, ev, none, nearest

    def _L_all(self, tables: OverlayTables | None) -> torch.Tensor:
        """L_ref rows of the searched labels: the base's, then the overlay's new ones."""
        return self.L_ref if tables is None or tables.L_new is None else torch.cat([self.L_ref, tables.L_new])

    def class_coverage(self, classes, tables: OverlayTables | None = None) -> list:
        """Per class its nearest labels in the searched reference set (base + overlay), their
        text cosine and segment counts, and whether one reaches t_none
        ([`reme.inference.unlabelled.class_coverage`][reme.inference.unlabelled.class_coverage]).

        Raises:
            ValueError: bad class list.
        """
        names, synonyms = parse_classes(classes)

        def make():
            L_test, owner = self.class_embeddings(synonyms)
            o_ref = self.o_ref if tables is None else tables.o_ref
            return none_rules.class_coverage(names, L_test, owner, self._L_all(tables), self._labels(tables),
                                             none_rules.label_segment_counts(o_ref.label, o_ref.num_labels),
                                             self.none_rule.label_threshold)

        key = ("coverage", tuple(names), tuple(map(tuple, synonyms)), self.none_rule.label_threshold)
        # a copy: the caller may change its records, the cached ones stay as made
        return copy.deepcopy(self._per_class_list(None if tables is None else tables.o_ref, key, make))

    def _per_class_list(self, overlay_part, key, make):
        """``make()``, kept in ``list_cache`` under ``key`` when ``overlay_part`` (overlay tables, or
        the part of them the value depends on) is None: values that depend only on the reference
        set and the class list are computed once per class list, not once per image."""
        return make() if overlay_part is not None else self.list_cache.get_or_make(key, make)

    @torch.inference_mode()
    def predict(self, image, classes, *, tables: OverlayTables | None = None, return_scores: bool = False,
                return_evidence: bool = False) -> SegmentationResult:
        """Segment one image into the given classes
        ([`Segmenter.predict`][reme.inference.segmenter.Segmenter.predict] documents the arguments);
        ``tables`` are the overlay's retrieval tables (None: the base alone).

        Raises:
            reme.errors.ImageReadError: unreadable image, an array of the wrong shape or dtype,
                or an image over `reme.io.MAX_PIXELS`.
            reme.errors.ImageTypeError: ``image`` is none of the accepted kinds.
            ValueError: bad class list.
        """
        img, full_hw = load_image_bounded(image, max_pixels=self.max_working_pixels)
        top = (self.top_k or DEFAULT_EVIDENCE_TOP) if return_evidence else None
        rule = self.none_rule
        seg, P, names, _, masks, evidence, none, nearest = self._segment_scores(img, classes, tables, top, rule)
        C = len(names)
        P_ext, unl = none_rules.extend_scores(P, none, nearest, rule) if rule.active else (P, None)
        working_hw = tuple(int(x) for x in seg.shape)
        if masks is None:
            seg_label = none_rules.to_label_map(P_ext.argmax(dim=1).cpu().numpy(), C)
            scores = upsample_scores(pixel_class_scores(P, seg), full_hw) if return_scores else None
            seg = upsample_nearest(seg, full_hw)
            label_map = seg_label[seg]                                                # eq. 3 argmax
        else:                                                                         # eq. 3, overlapping masks
            P_test = pixel_class_scores_masks(P_ext.clamp_min(0), masks)
            label_map = upsample_nearest(none_rules.to_label_map(P_test.argmax(dim=2).cpu().numpy(), C), full_hw)
            seg = upsample_nearest(seg, full_hw)
            scores = upsample_scores(P_test[..., :C], full_hw) if return_scores else None
            del P_test
        extras, unl_frac, coverage = {"working_size": working_hw}, 0.0, None
        if rule.active:                                                               # "none of these"
            fractions, unl_frac = none_rules.label_fractions(label_map, C)
            nan = np.full(P.shape[0], np.nan, np.float32)
            extras.update(unlabelled_segments=unl.cpu().numpy(),
                          none_scores=nan if none is None else none.float().cpu().numpy(),
                          nearest_similarity=nan if nearest is None else nearest.float().cpu().numpy())
            coverage = self.class_coverage(classes, tables) if rule.label_threshold is not None else None
        else:
            fractions = label_fractions(label_map, C)
        return SegmentationResult(label_map=label_map, classes=names, segment_ids=seg,
                                  segment_scores=P.cpu().numpy().astype(np.float32),
                                  class_fractions=fractions, scores=scores, extras=extras, evidence=evidence,
                                  unlabelled_fraction=unl_frac, coverage=coverage)
