"""The demo's work, independent of the web framework: segment a photo, keep the result, answer
"why did this segment get its label?" with retrieval evidence ([`reme.inference.evidence`][reme.inference.evidence]),
and teach by example: label a clicked segment, re-segment with it, undo
([`Segmenter.add_examples`][reme.inference.segmenter.Segmenter.add_examples], issue 15).

Whose examples: by default each browser session (a random id in a cookie) has its own in-memory
overlay per reference set, invisible to every other session; the `MAX_SESSIONS` most recently
used sessions are kept (an older session's examples are forgotten). With ``overlay=DIR`` every
session shares one overlay folder instead (one reference set only), written under the
segmenter lock and saved atomically after each add or undo.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from reme.report.crops import THUMB, ReferenceImages, crop_thumbnail, placeholder_thumbnail
from reme.io import MAX_PIXELS, SAMPLE_PHOTOS, sample_image, to_rgb_array
from reme.report.viz import class_colors

logger = logging.getLogger(__name__)

#: Longest image side the demo segments at; larger uploads are downscaled first (our choice:
#: keeps one request at a few seconds on a 2-core CPU with the classical encoder).
MAX_SIDE = 800
#: Results kept for evidence look-ups (LRU).
MAX_RESULTS = 16
#: Largest upload accepted, in bytes (checked before anything is decoded).
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
#: Uploads decoded at the same time; the others wait their turn (bounds decode memory: a JPEG is
#: decoded at a reduced scale near ``MAX_SIDE``, other formats at full size, at most
#: ``MAX_PIXELS`` each).
DECODE_SLOTS = 2
#: Classes per request, and class names counting synonyms (a 5000-class request held the
#: segmentation lock for 37 s; 50 classes take about as long as the segmentation itself).
MAX_CLASSES = 50
MAX_CLASS_TERMS = 200
#: Characters in the class field.
MAX_CLASS_CHARS = 4000
#: Seconds a request waits for its turn at the segmenter before it is refused as busy.
QUEUE_TIMEOUT_S = 60.0
#: Browser sessions whose own overlays are kept in memory (LRU; a session pushed out loses its
#: examples). Each holds a shallow Segmenter copy (shared encoders and reference) and its rows.
MAX_SESSIONS = 64
#: Examples one session may add (per reference set); a shared overlay takes `MAX_SHARED_EXAMPLES`.
MAX_EXAMPLES = 200
MAX_SHARED_EXAMPLES = 2000
#: Characters in a taught label.
MAX_LABEL_CHARS = 60
#: A session id as the server issues it (``secrets.token_urlsafe(24)``); others are replaced.
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{20,64}")
DEFAULT_CLASSES = "person, sky, building, tree, road, car, cat, dog"


@dataclass
class _Result:
    image: np.ndarray
    segment_ids: np.ndarray
    label_map: np.ndarray
    segment_scores: np.ndarray
    classes: list[str]
    evidence: Any
    reference: str
    class_spec: Any
    session: str = ""
    image_name: str = "photo"
    searched: Any = None  # the (merged) ReferenceSet the evidence indexes


@dataclass
class _Session:
    """One browser session: its Segmenter copy (own overlay) per reference set, and the pixels
    of the photos its examples came from (thumbnails of taught rows)."""
    segmenters: dict
    images: dict
    records: dict = field(default_factory=dict)  # reference name -> `examples` answer


def png_data_url(img: Image.Image | np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URL of an RGB image."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class BusyError(RuntimeError):
    """The segmenter stayed busy for `QUEUE_TIMEOUT_S`; the request should be retried later."""


_decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)


def read_upload(data: bytes, max_side: int = MAX_SIDE) -> np.ndarray:
    """Decode uploaded image bytes to (H, W, 3) uint8 RGB at the demo's working size.

    The header is read first (size and pixel-count checks, nothing decoded); the pixels are then
    decoded while holding one of `DECODE_SLOTS` slots, JPEGs at the smallest DCT scale that
    keeps the longest side at least ``max_side`` (``PIL.Image.draft``), and the result is
    reduced to ``max_side`` (see `downscale`) before the slot is released.

    Args:
        data: the uploaded file's bytes.
        max_side: longest side of the returned image, in pixels.

    Returns:
        (H, W, 3) uint8 RGB, EXIF orientation applied, longest side at most ``max_side``.

    Raises:
        ValueError: empty, larger than `MAX_UPLOAD_BYTES`, not an image, damaged, or more
            pixels than `reme.io.MAX_PIXELS` (100 million); the message is plain text.
    """
    if not data:
        raise ValueError("the uploaded file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(f"the upload is {len(data) / 2**20:.0f} MiB; the demo takes files up to "
                         f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ValueError(f"the image has more than {MAX_PIXELS} pixels; downscale it first") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError("cannot decode the uploaded file as an image: not a format Pillow reads "
                         "(JPEG, PNG, WebP, TIFF, BMP, GIF, ...)") from exc
    with img:
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"the image is {img.width}x{img.height} = {img.width * img.height} pixels, over "
                             f"the limit of {MAX_PIXELS}; downscale it first")
        with _decode_slots:
            try:
                if img.format == "JPEG" and max(img.size) > max_side:
                    s = max_side / max(img.size)
                    img.draft("RGB", (max(1, int(img.width * s)), max(1, int(img.height * s))))
                img.load()
                arr = to_rgb_array(img)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                raise ValueError("cannot decode the uploaded file as an image: the data is truncated "
                                 f"or damaged ({type(exc).__name__})") from exc
            return downscale(arr, max_side)


def check_classes(classes: str) -> tuple[list[str], list[list[str]]]:
    """Parse a class field of the demo form and apply its limits.

    Returns:
        ``(names, synonyms)`` as [`reme.classes.parse_classes`][reme.classes.parse_classes].

    Raises:
        ValueError: empty, malformed (see `parse_classes`), longer than `MAX_CLASS_CHARS`
            characters, more than `MAX_CLASSES` classes or `MAX_CLASS_TERMS` names with synonyms.
    """
    from reme.classes import parse_classes

    if not classes or not classes.strip():
        raise ValueError("type at least one class name, e.g. 'cat, dog, sofa'")
    if len(classes) > MAX_CLASS_CHARS:
        raise ValueError(f"the class list has {len(classes)} characters; the demo takes up to {MAX_CLASS_CHARS}")
    n = sum(1 for item in classes.split(",") if item.strip())  # before parsing: the message stays short
    if n > MAX_CLASSES:
        raise ValueError(f"{n} classes; the demo takes up to {MAX_CLASSES} per request")
    names, synonyms = parse_classes(classes)
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{len(names)} classes; the demo takes up to {MAX_CLASSES} per request")
    terms = sum(len(s) for s in synonyms)
    if terms > MAX_CLASS_TERMS:
        raise ValueError(f"{terms} class names with synonyms; the demo takes up to {MAX_CLASS_TERMS} per request")
    return names, synonyms


def check_label(label: str) -> str:
    """A label typed in the demo's "Label this as" field, normalised (white space collapsed).

    Raises:
        ValueError: empty, longer than `MAX_LABEL_CHARS` characters, or containing ``,`` or
            ``;`` (they separate classes and synonyms in the class field).
    """
    text = " ".join(str(label or "").split())
    if not text:
        raise ValueError("type a label for the segment, e.g. 'rug'")
    if len(text) > MAX_LABEL_CHARS:
        raise ValueError(f"the label has {len(text)} characters; the demo takes up to {MAX_LABEL_CHARS}")
    if "," in text or ";" in text:
        raise ValueError("a label cannot contain ',' or ';' (they separate classes and synonyms)")
    return text


def with_class(class_spec: str, label: str) -> tuple[str, str]:
    """``(class_spec, label)`` with ``label`` appended as a new class, unless a class or synonym
    already has that name (case-insensitive): then the spec unchanged and the label spelled as
    there ("Cat" -> "cat")."""
    from reme.classes import parse_classes

    _, synonyms = parse_classes(class_spec)
    for name in (x for syns in synonyms for x in syns):
        if name.lower() == label.lower():
            return class_spec, name
    return f"{class_spec.rstrip().rstrip(',')}, {label}", label


def downscale(image: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """``image`` with its longest side reduced to ``max_side`` (unchanged if already smaller)."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((max(1, round(w * s)), max(1, round(h * s))),
                                                    Image.Resampling.LANCZOS))


def blend(image: np.ndarray, label_map: np.ndarray, n_classes: int, alpha: float = 0.5,
          outline: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 colour overlay of a label map; ``outline`` (H, W) bool is drawn in yellow."""
    colors = class_colors(n_classes).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + colors[np.maximum(label_map, 0)] * alpha
    out[label_map < 0] = image[label_map < 0]                   # unlabelled ("none of these"): the photo
    if outline is not None:
        m = outline
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        edge |= np.roll(edge, 1, 0) | np.roll(edge, 1, 1)
        out[m] = out[m] * 0.6 + 255 * 0.4
        out[edge] = (255, 230, 0)
    return out.clip(0, 255).astype(np.uint8)


def _pixels_hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:8]


def _hex(c) -> str:
    return "#%02x%02x%02x" % tuple(int(v) for v in c)


class DemoBackend:
    """Segmenters per reference set and the recent results of one demo server.

    Args:
        references: display name -> reference folder; the first is the default.
        image_roots: extra folders with reference source photos (evidence thumbnails).
        device: torch device for the segmenters (None: CUDA if available).
        segmenter_kwargs: passed to every [`reme.inference.segmenter.Segmenter`][reme.inference.segmenter.Segmenter].
        overlay: None (each session teaches its own in-memory overlay, module docstring), or
            an overlay folder shared by every session (loaded if it exists, else created by
            the first example; saved atomically after each add and undo). A shared overlay
            needs exactly one reference set.

    Raises:
        ValueError: no reference set given; a shared overlay with several reference sets.
    """

    def __init__(self, references: Mapping[str, str | Path], *, image_roots: Sequence[str | Path] = (),
                 device: str | None = None, segmenter_kwargs: Mapping[str, Any] | None = None,
                 overlay: str | Path | None = None):
        if not references:
            raise ValueError("the demo needs at least one reference set")
        if overlay is not None and len(references) != 1:
            raise ValueError(f"a shared overlay (--overlay) needs exactly one reference set, got {len(references)}; "
                             "start one demo per reference set")
        self.overlay = Path(overlay) if overlay is not None else None
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._shared = _Session({}, {})
        self._state_lock = threading.RLock()  # the session table (short holds, never while segmenting)
        self.references = {str(k): Path(v) for k, v in references.items()}
        self.image_roots = list(image_roots)
        self.device = device
        self.segmenter_kwargs = dict(segmenter_kwargs or {})
        self._segmenters: dict[str, Any] = {}
        self._images: dict[str, ReferenceImages] = {}
        self._results: OrderedDict[str, _Result] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def default_reference(self) -> str:
        return next(iter(self.references))

    def config(self) -> dict[str, Any]:
        """What the page needs to draw its form."""
        return {"references": list(self.references), "default_reference": self.default_reference,
                "samples": list(SAMPLE_PHOTOS), "default_classes": DEFAULT_CLASSES, "max_side": MAX_SIDE,
                "max_classes": MAX_CLASSES, "max_upload_bytes": MAX_UPLOAD_BYTES,
                "max_label_chars": MAX_LABEL_CHARS, "max_examples": self._max_examples(),
                "shared_overlay": self.overlay is not None}

    def segmenter(self, name: str):
        """The (cached) Segmenter of reference ``name``.

        Raises:
            KeyError: unknown reference name.
        """
        if name not in self.references:
            raise KeyError(f"unknown reference set {name!r}; choose from {', '.join(self.references)}")
        if name in self._segmenters:  # loaded: no need to wait for a running prediction
            return self._segmenters[name]
        with self._lock:
            if name not in self._segmenters:
                from reme.inference.segmenter import Segmenter

                t0 = time.time()
                seg = Segmenter(self.references[name], device=self.device, **self.segmenter_kwargs)
                self._images[name] = ReferenceImages.for_reference(seg.reference, self.image_roots)
                self._segmenters[name] = seg
                logger.info("loaded reference %s from %s in %.1f s", name, self.references[name], time.time() - t0)
            return self._segmenters[name]

    def _max_examples(self) -> int:
        return MAX_SHARED_EXAMPLES if self.overlay is not None else MAX_EXAMPLES

    def _session(self, session: str) -> _Session:
        """The state of ``session`` (the shared one with a shared overlay); LRU-bounded."""
        if self.overlay is not None:
            return self._shared
        with self._state_lock:
            state = self._sessions.get(session)
            if state is None:
                state = self._sessions[session] = _Session({}, {})
                while len(self._sessions) > MAX_SESSIONS:
                    self._sessions.popitem(last=False)
            self._sessions.move_to_end(session)
            return state

    def session_segmenter(self, session: str, name: str | None = None):
        """The Segmenter of ``session`` for reference ``name``: the reference's Segmenter with
        the session's own overlay ([`Segmenter.with_overlay`][reme.inference.segmenter.Segmenter.with_overlay]),
        or with the shared overlay folder when the backend has one.

        Raises:
            KeyError: unknown reference name.
        """
        name = name or self.default_reference
        base = self.segmenter(name)
        state = self._session(session)
        with self._state_lock:
            seg = state.segmenters.get(name)
            if seg is None:
                seg = state.segmenters[name] = base.with_overlay(self.overlay)
                state.records[name] = self._records(seg)
            return seg

    @contextmanager
    def _turn(self):
        """Hold the segmenter lock (one segmentation, example or undo at a time; it also
        serializes the writes to a shared overlay), waiting at most `QUEUE_TIMEOUT_S`.

        Raises:
            BusyError: the wait timed out.
        """
        if not self._lock.acquire(timeout=QUEUE_TIMEOUT_S):
            raise BusyError(f"the demo is busy with other requests (waited {QUEUE_TIMEOUT_S:.0f} s); try again")
        try:
            yield
        finally:
            self._lock.release()

    def segment(self, image: np.ndarray, classes: str, reference: str | None = None, *, session: str = "",
                image_name: str = "photo") -> dict[str, Any]:
        """Segment ``image`` into ``classes`` (with the examples of ``session``) and keep the
        result for `evidence` and `add_example`.

        Returns:
            JSON-ready dict: ``result_id``, ``width``, ``height``, ``overlay`` (PNG data URL),
            ``legend`` (class, colour, pixel fraction, largest segment score per class),
            ``num_segments``, ``seconds``, ``reference``, ``resized`` (bool), ``classes`` (the
            class field), ``examples`` (number in the overlay used).

        Raises:
            KeyError: unknown reference. ValueError: bad class list or over the limits of
            `check_classes`. BusyError: waited `QUEUE_TIMEOUT_S` for the segmenter.
        """
        check_classes(classes)
        name = reference or self.default_reference
        self.segmenter(name)  # loads the reference set (under the lock) if needed
        small = downscale(image)
        with self._turn():
            seg = self.session_segmenter(session, name)
            out = self._predict(seg, small, classes, name, session, image_name)
        out["resized"] = small.shape != image.shape
        return out

    def _predict(self, seg, small: np.ndarray, classes: str, name: str, session: str, image_name: str) -> dict:
        """Segment (the lock held) and keep the result."""
        t0 = time.time()
        rid = uuid.uuid4().hex[:12]
        res = seg.predict(small, classes, return_evidence=True)
        searched = seg.merged_reference()
        self._results[rid] = _Result(small, res.segment_ids, res.label_map, res.segment_scores, res.classes,
                                     res.evidence, name, classes, session, image_name, searched)
        while len(self._results) > MAX_RESULTS:
            self._results.popitem(last=False)
        secs = time.time() - t0
        colors = class_colors(len(res.classes))
        pixels = np.bincount(res.label_map[res.label_map >= 0], minlength=len(res.classes))  # -1: unlabelled
        legend = [{"class": c, "color": _hex(colors[i]), "fraction": round(float(res.class_fractions[i]), 5),
                   "pixels": int(pixels[i]), "max_segment_score": round(float(res.segment_scores[:, i].max()), 5)}
                  for i, c in enumerate(res.classes)]
        return {"result_id": rid, "width": int(small.shape[1]), "height": int(small.shape[0]),
                "overlay": png_data_url(blend(small, res.label_map, len(res.classes))),
                "legend": legend, "num_segments": int(res.segment_scores.shape[0]), "seconds": round(secs, 2),
                "reference": name, "resized": False, "classes": classes, "examples": len(seg.examples())}

    def _result(self, result_id: str, session: str) -> _Result:
        r = self._results.get(result_id)
        if r is None or r.session != session:
            raise KeyError(f"result {result_id!r} expired or unknown; segment the image again")
        return r

    def add_example(self, session: str, result_id: str, label: str, *, segment_id: int | None = None,
                    x: int | None = None, y: int | None = None, resegment: bool = True) -> dict[str, Any]:
        """Teach by example: add one segment of a kept result, with ``label``, to the session's
        overlay (its pieces: ``Segmenter.add_examples(image, [segment_id], label)``), then
        segment the same image again with the same classes (``label`` appended as a class when
        no class or synonym has that name).

        Args:
            session: the session id (ignored with a shared overlay, whose examples all share).
            result_id: a result of `segment` made in this session.
            label: the label (`check_label`).
            segment_id: the segment, an id of the result's segment map; or give ``x, y``, a pixel
                of the result image.
            resegment: also return the new segmentation (else ``result`` is None).

        Returns:
            ``{"example_id", "examples": [...] (see `examples`), "classes": the new class field,
            "result": `segment`'s answer or None, "seconds": {"add", "segment"}}``.

        Raises:
            KeyError: unknown or expired result (or one of another session).
            ValueError: bad label, segment id or pixel outside the result, too many classes,
                or the session holds `MAX_EXAMPLES` examples already.
            BusyError: as `segment`.
        """
        label = check_label(label)
        r = self._result(result_id, session)
        n_seg = int(r.segment_scores.shape[0])
        if segment_id is None:
            if x is None or y is None:
                raise ValueError("give the segment: segment_id, or the pixel x and y")
            h, w = r.segment_ids.shape
            if not (0 <= x < w and 0 <= y < h):
                raise ValueError(f"pixel ({x}, {y}) lies outside the {w}x{h} image")
            segment_id = int(r.segment_ids[y, x])
        if not 0 <= int(segment_id) < n_seg:
            raise ValueError(f"segment id {segment_id} outside [0, {n_seg}) for this result")
        classes, label = with_class(r.class_spec, label)
        check_classes(classes)
        with self._turn():
            seg = self.session_segmenter(session, r.reference)
            state = self._session(session)
            if len(seg.examples()) >= self._max_examples():
                raise ValueError(f"this {'shared overlay' if self.overlay else 'session'} holds "
                                 f"{self._max_examples()} examples, the demo's limit; undo some first")
            t0 = time.time()
            image_name = f"demo:{r.image_name}#{_pixels_hash(r.image)}"
            eid = seg.add_examples(r.image, [int(segment_id)], label, image_name=image_name,
                                   save=self.overlay is not None)
            if not eid:  # cannot happen for a segment of the result; said plainly if it does
                raise ValueError(f"segment {segment_id} selects no pixels of the photo")
            state.images[image_name] = r.image
            records = state.records[r.reference] = self._records(seg)
            t1 = time.time()
            result = self._predict(seg, r.image, classes, r.reference, session, r.image_name) if resegment else None
            t2 = time.time()
        logger.info("example %s (%s, segment %d) added in %.2f s", eid, label, segment_id, t1 - t0)
        return {"example_id": eid, "examples": records, "classes": classes, "result": result,
                "seconds": {"add": round(t1 - t0, 3), "segment": round(t2 - t1, 3) if resegment else None}}

    def undo_example(self, session: str, example_id: str | None = None, *, reference: str | None = None,
                     result_id: str | None = None) -> dict[str, Any]:
        """Remove one example of the session's overlay (None or "": the last added; ``"all"``:
        every one), then, given a ``result_id``, segment that result's image again.

        Returns:
            ``{"removed": rows removed, "examples": [...], "result": `segment`'s answer or None}``.

        Raises:
            KeyError: no such example, unknown reference or result. BusyError: as `segment`.
        """
        r = self._result(result_id, session) if result_id else None
        name = r.reference if r is not None else (reference or self.default_reference)
        self.segmenter(name)
        with self._turn():
            seg = self.session_segmenter(session, name)
            n = seg.remove_examples(example_id or None, save=self.overlay is not None)
            self._forget_images(session)
            records = self._session(session).records[name] = self._records(seg)
            result = self._predict(seg, r.image, r.class_spec, name, session, r.image_name) if r is not None else None
        return {"removed": n, "examples": records, "result": result}

    def examples(self, session: str, reference: str | None = None) -> list[dict[str, Any]]:
        """The examples the session's overlay holds for ``reference`` (default: the first), in
        the order added: ``example_id``, ``label``, ``image``, ``rows``, ``added`` (UTC ISO).

        Raises:
            KeyError: unknown reference.
        """
        name = reference or self.default_reference
        if name not in self.references:
            raise KeyError(f"unknown reference set {name!r}; choose from {', '.join(self.references)}")
        if self.overlay is None and session not in self._sessions:
            return []  # a page load alone does not take a session slot from the others
        self.session_segmenter(session, name)
        return list(self._session(session).records[name])  # a snapshot, updated under the lock

    @staticmethod
    def _records(seg) -> list[dict[str, Any]]:
        out = []
        for e in seg.examples():
            image = e["image"]
            if image.startswith("demo:"):
                image = image[5:].rsplit("#", 1)[0]
            out.append({"example_id": e["example_id"], "label": ", ".join(e["labels"]), "image": image,
                        "rows": e["rows"], "added": e["added"]})
        return out

    def _forget_images(self, session: str) -> None:
        state = self._session(session)
        used = {x for s in state.segmenters.values() for x in s.overlay.images}
        for k in [k for k in state.images if k not in used]:
            del state.images[k]

    def evidence(self, result_id: str, x: int, y: int, session: str = "") -> dict[str, Any]:
        """Why the segment under pixel (x, y) got its label.

        Returns:
            JSON-ready dict: ``segment``, ``class``, ``class_scores`` (P_seg row, largest
            first), ``covered``, ``votes`` (A1 row: reference label, weight, the test class
            that label speaks for most in A2 (eq. 2), and that A2 weight), ``neighbours``
            (reference id, similarity, weight, labels, source image, bbox, stage (``example``
            for a taught segment), ``thumb`` URL), ``highlight`` (PNG data URL with the segment
            outlined), ``images_readable`` (False: the reference photos are not found here and
            thumbnails are placeholders).

        Raises:
            KeyError: unknown or expired result, or one of another session.
            ValueError: (x, y) outside the image.
        """
        r = self._result(result_id, session)
        h, w = r.segment_ids.shape
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"pixel ({x}, {y}) lies outside the {w}x{h} image")
        s = int(r.segment_ids[y, x])
        m = self.segmenter(r.reference).reference.num_segments
        rec = r.evidence.records(r.searched, [s])[0]
        for n in rec["neighbours"]:
            n["thumb"] = (f"api/refcrop/{r.reference}/{n['reference_id']}.png" if n["reference_id"] < m
                          else f"api/examplecrop/{result_id}/{n['reference_id']}.png")
            if n["reference_id"] >= m and n.get("image", "").startswith("demo:"):
                n["image"] = n["image"][5:].rsplit("#", 1)[0]
        rec["votes"] = [[lab, w, *cls] for (lab, w), cls in zip(rec["votes"], self._label_to_class(r, rec["votes"]))]
        probs = r.segment_scores[s]
        order = np.argsort(-probs)
        rec.update({
            "class": r.classes[int(r.label_map[y, x])] if r.label_map[y, x] >= 0 else None,  # None: unlabelled
            "class_scores": [[r.classes[i], round(float(probs[i]), 5)] for i in order],
            "area": int((r.segment_ids == s).sum()),
            "highlight": png_data_url(blend(r.image, r.label_map, len(r.classes), outline=r.segment_ids == s)),
            "logit_scale": r.evidence.logit_scale, "support": r.evidence.support,
            "images_readable": self._images[r.reference].readable,
        })
        return rec

    def _label_to_class(self, r: _Result, votes) -> list[tuple[str, float]]:
        """For each voting reference label, its best test class in A2 (eq. 2) and that weight."""
        from reme.classes import parse_classes
        from reme.inference.evidence import label_class_affinity
        from reme.encoders.text import embed_labels

        if not votes:
            return []
        seg = self.segmenter(r.reference)
        ref = r.searched  # the base, or base + the overlay searched (its new labels appended)
        names, synonyms = parse_classes(r.class_spec)
        flat = [x for syns in synonyms for x in syns]
        owner = [ci for ci, syns in enumerate(synonyms) for _ in syns]
        index = {lab: j for j, lab in enumerate(ref.labels)}
        rows = np.asarray(ref.L_ref, np.float32)[[index[lab] for lab, _ in votes]]
        A2 = label_class_affinity(rows, embed_labels(seg.text_encoder, flat, seg.templates),
                                  logit_scale=seg.label_logit_scale, owner=owner, num_classes=len(names))
        best = A2.argmax(axis=1)
        return [(names[b], round(float(A2[i, b]), 5)) for i, b in enumerate(best)]

    def example_crop(self, session: str, result_id: str, segment_id: int, size: int = THUMB) -> Image.Image:
        """Thumbnail of a taught segment (an overlay row) that a kept result searched: a crop of
        the photo it was taught on while the session holds it, else a placeholder tile.

        Raises:
            KeyError: unknown or expired result. IndexError: not an overlay row of that result.
        """
        r = self._result(result_id, session)
        m = self.segmenter(r.reference).reference.num_segments
        ref = r.searched
        if not m <= segment_id < ref.num_segments:
            raise IndexError(f"segment id {segment_id} is not a taught segment ([{m}, {ref.num_segments}))")
        name = ref.segment_image[segment_id]
        pixels = self._session(session).images.get(name)
        if pixels is None:
            return placeholder_thumbnail(size, detail=name.removeprefix("demo:").rsplit("#", 1)[0])
        return crop_thumbnail(pixels, ref.segment_bbox[segment_id], size)

    def reference_crop(self, reference: str, segment_id: int, size: int = THUMB) -> Image.Image:
        """Thumbnail of one reference segment (a placeholder tile when its photo is unreadable).

        Raises:
            KeyError: unknown reference. IndexError: segment id out of range.
        """
        ref = self.segmenter(reference).reference
        if not 0 <= segment_id < ref.num_segments:
            raise IndexError(f"segment id {segment_id} outside [0, {ref.num_segments})")
        return self._images[reference].thumbnail(ref.segment_image[segment_id], ref.segment_bbox[segment_id], size)

    @staticmethod
    def sample(name: str) -> np.ndarray:
        """A bundled photo (`reme.io.SAMPLE_PHOTOS`); raises ImageReadError if unknown."""
        return sample_image(name)
