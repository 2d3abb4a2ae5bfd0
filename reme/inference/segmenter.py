"""``Segmenter``: open-vocabulary semantic segmentation of one image by retrieval (docs/method.md
Part 2), the friendly facade over a stateless [`Predictor`][reme.inference.predictor.Predictor]
and an [`OverlayEditor`][reme.inference.editor.OverlayEditor] of examples."""

from __future__ import annotations

import copy
import difflib
import inspect
from pathlib import Path

from reme.inference.editor import OverlayEditor
from reme.inference.maps import label_fractions, upsample_nearest, upsample_scores
from reme.inference.predictor import (
    A2_CACHE_SIZE,
    DEFAULT_LABEL_LOGIT_SCALE,
    DEFAULT_MAX_WORKING_PIXELS,
    DEFAULT_SEGMENT_LOGIT_SCALE,
    DEFAULT_TOP_K,
    Predictor,
    SegmentationResult,
)
from reme.reference import ReferenceSet
from reme.reference.overlay import Overlay

__all__ = ["Segmenter", "SegmentationResult", "A2_CACHE_SIZE", "DEFAULT_LABEL_LOGIT_SCALE",
           "DEFAULT_MAX_WORKING_PIXELS", "DEFAULT_SEGMENT_LOGIT_SCALE", "DEFAULT_TOP_K",
           "label_fractions", "upsample_nearest", "upsample_scores"]

#: Settings read through to the predictor (read-only; make a new Segmenter to change one).
_SETTINGS = ("reference", "visual_encoder", "text_encoder", "felzenszwalb", "segment_logit_scale",
             "label_logit_scale", "top_k", "templates", "device", "chunk_size", "retrieval", "smooth_omega",
             "others_threshold", "max_working_pixels", "example_bias", "view_cache_size", "proposer", "index",
             "none_rule")

#: The keywords a Segmenter passes to its Predictor (``**settings``): Predictor's keyword-only
#: parameters, each documented there with its default.
_PREDICTOR_KEYWORDS = tuple(name for name, p in inspect.signature(Predictor.__init__).parameters.items()
                            if p.kind is p.KEYWORD_ONLY)


def _unknown_keyword(name: str) -> str:
    """The TypeError message for a keyword that is neither ``overlay`` nor a Predictor setting."""
    close = difflib.get_close_matches(name, ("overlay", *_PREDICTOR_KEYWORDS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"Segmenter() got an unexpected keyword argument {name!r}{hint}"


class Segmenter:
    """Training-free open-vocabulary segmenter (ReME inference, docs/method.md Part 2).

    Every keyword but ``reference`` and ``overlay`` is passed on as a setting of the
    [`Predictor`][reme.inference.predictor.Predictor] it wraps (visual_encoder, text_encoder,
    felzenszwalb, segment_logit_scale, label_logit_scale, top_k, templates,
    allow_encoder_mismatch, device, chunk_size, retrieval, proposals, n_clusters, smooth_omega,
    others_threshold, max_working_pixels, example_bias, view_cache_size, unlabelled), documented
    there with its default and readable here as an attribute of the same name (``unlabelled``, the
    "none of these" rule, on by default, as ``none_rule``, a
    [`NoneRule`][reme.inference.unlabelled.NoneRule]). Results are numpy.

    Args:
        reference: a reference folder path or a loaded
            [`ReferenceSet`][reme.reference.ReferenceSet].
        overlay: segments added by example ([`reme.reference.overlay`][reme.reference.overlay]), searched together
            with the reference set: an overlay folder (loaded when it exists, else created
            there by `save_overlay`), an [`Overlay`][reme.reference.overlay.Overlay], or None (an empty
            in-memory overlay; `add_examples` still works). An empty overlay changes nothing.
        **settings: the Predictor's keywords, with its defaults (``inspect.signature(Segmenter)``
            and ``help(Segmenter)`` list them all).

    Raises:
        TypeError: a keyword that is neither ``overlay`` nor a Predictor setting (the message
            suggests the nearest name).
        ReferenceSetError: the encoders do not match the reference set, or the overlay was made
            with other encoders than the reference set.
        ValueError: the overlay path is inside the reference folder, example_bias outside [0, 1]
            or without top_k; a logit scale that is not a finite number in (0, 1000], top_k < 1, an
            unknown retrieval, smooth_omega outside [0, 1), max_working_pixels < 1, a negative or
            non-finite others_threshold, an unlabelled threshold outside [-1, 1].
    """

    def __init__(self, reference: str | Path | ReferenceSet, *, overlay: str | Path | Overlay | None = None,
                 **settings):
        unknown = [name for name in settings if name not in _PREDICTOR_KEYWORDS]
        if unknown:
            raise TypeError(_unknown_keyword(unknown[0]))
        self.predictor = Predictor(reference, **settings)
        self.editor = OverlayEditor(self.predictor, overlay)

    def __getattr__(self, name):
        if name in _SETTINGS and "predictor" in self.__dict__:
            return getattr(self.__dict__["predictor"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        """Reassigning a setting (``seg.example_bias = 1.0``, as before issue 21) gives this
        Segmenter its own shallow copy of the predictor with the new value, sharing the locked
        caches (their keys hold what the values depend on); other Segmenters sharing the
        predictor (`with_overlay`) keep theirs. The value is not re-validated."""
        if name in _SETTINGS:
            p = copy.copy(self.predictor)
            setattr(p, name, value)
            self.__dict__["predictor"] = p
            self.editor.predictor = p
        else:
            object.__setattr__(self, name, value)

    @property
    def overlay(self) -> Overlay:
        """The [`Overlay`][reme.reference.overlay.Overlay] of examples this Segmenter searches."""
        return self.editor.overlay

    @property
    def proposals(self) -> str:
        """The proposal method in use ("felzenszwalb", "cluster", "sam[:MODEL]")."""
        return self.predictor.proposer.method

    @property
    def n_clusters(self) -> int:
        """k of the "cluster" proposals."""
        return self.predictor.proposer.n_clusters

    @property
    def overlapping_proposals(self) -> bool:
        """True when proposals may overlap (SAM masks): eq. 3 then sums over masks."""
        return self.predictor.proposer.overlapping

    # ------------------------------------------------------------------ examples (OverlayEditor)

    def with_overlay(self, overlay: str | Path | Overlay | None = None) -> "Segmenter":
        """A Segmenter sharing this one's predictor (encoders, reference set and its locked caches:
        A2 of the base labels, the FAISS index, the cached image views, none of which depend on the
        overlay) but editing and searching another overlay (one per demo session). None: a new
        empty overlay.

        Raises:
            ReferenceSetError, ValueError: as for ``overlay`` in the constructor.
        """
        other = object.__new__(type(self))
        other.predictor = self.predictor
        other.editor = OverlayEditor(self.predictor, overlay)
        return other

    def examples(self) -> list[dict]:
        """The added examples, one record each ([`Overlay.examples`][reme.reference.overlay.Overlay.examples])."""
        return self.editor.examples()

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
        return self.editor.add_examples(image, mask_or_segment_ids, label, min_purity=min_purity,
                                        image_name=image_name, save=save)

    def remove_examples(self, example_id: str | None = None, *, save: bool = False) -> int:
        """Undo: remove the segments of one example (None: the last added; "all": every one).

        Returns:
            How many segments were removed.

        Raises:
            KeyError: no example with that id.
        """
        return self.editor.remove_examples(example_id, save=save)

    def save_overlay(self, path: str | Path | None = None) -> Path:
        """Write the overlay to ``path`` (default: its folder) as one transaction
        ([`Overlay.save`][reme.reference.overlay.Overlay.save]: rows other writers added meanwhile
        are merged in, and the retrieval tables are rebuilt to include them).

        Returns:
            The folder written.

        Raises:
            ValueError: no path, or a path inside the reference folder.
            ReferenceSetError: the overlay already in that folder is damaged or was made with
                other encoders; nothing is written.
        """
        return self.editor.save_overlay(path)

    def merged_reference(self) -> ReferenceSet:
        """The reference set `predict` searches: the base's rows and labels followed by the
        overlay's (the base itself when the overlay is empty); S_ref is a view, not a copy."""
        return self.editor.merged_reference()

    # ------------------------------------------------------------------ inference (Predictor)

    def segment_scores(self, image, classes, *, return_embeddings: bool = False,
                       return_masks: bool = False, return_none: bool = False) -> tuple:
        """Proposals and P_seg of one image (eqs. 1-2), as torch tensors (the one public call that
        returns tensors, for the evaluation protocol; `predict` returns numpy).

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
            pixel); P_seg is a (k, C) float32 tensor on the segmenter's device.

        Raises:
            ValueError: bad class list.
            reme.errors.ImageReadError: unreadable image.
        """
        return self.predictor.segment_scores(image, classes, tables=self.editor.tables,
                                             return_embeddings=return_embeddings, return_masks=return_masks,
                                             return_none=return_none)

    def class_coverage(self, classes) -> list:
        """Per class its nearest labels in the searched reference set (base + overlay), their
        text cosine and segment counts, and whether one reaches t_none
        ([`reme.inference.unlabelled.class_coverage`][reme.inference.unlabelled.class_coverage]).

        Raises:
            ValueError: bad class list.
        """
        return self.predictor.class_coverage(classes, self.editor.tables)

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
            indexes ``classes``, -1 where the "none of these" rule leaves a pixel unlabelled).

        Raises:
            reme.errors.ImageReadError: unreadable image, an array of the wrong shape or dtype,
                or an image over `reme.io.MAX_PIXELS` (also for a PIL image).
            reme.errors.ImageTypeError: ``image`` is none of the accepted kinds (bytes, None, a
                list, a tensor); a TypeError and an ImageReadError.
            ValueError: bad class list.
        """
        return self.predictor.predict(image, classes, tables=self.editor.tables, return_scores=return_scores,
                                      return_evidence=return_evidence)

    # ------------------------------------------------------------------ for tests and benchmarks

    def _class_affinity(self, synonyms):
        return self.predictor.class_affinity(synonyms, self.editor.tables)

    def _class_embeddings(self, synonyms):
        return self.predictor.class_embeddings(synonyms)

    @property
    def _merged(self):
        return self.editor.tables

    @property
    def _views(self):
        return self.predictor.view_cache


def _segmenter_signature() -> inspect.Signature:
    """Predictor.__init__'s signature with Segmenter's ``overlay`` keyword after ``reference``,
    so ``inspect.signature(Segmenter)`` and ``help(Segmenter)`` list every setting with its
    default."""
    overlay = inspect.signature(Segmenter.__init__).parameters["overlay"]
    predictor = inspect.signature(Predictor.__init__)
    self_, reference, *settings = predictor.parameters.values()
    return predictor.replace(parameters=[self_, reference, overlay, *settings])


Segmenter.__init__.__signature__ = _segmenter_signature()
