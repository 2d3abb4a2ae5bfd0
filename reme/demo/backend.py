"""The demo's work, independent of the web framework: segment a photo, keep the result, answer
"why did this segment get its label?" with retrieval evidence ([`reme.evidence`][reme.evidence])."""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from reme.crops import THUMB, ReferenceImages
from reme.io import MAX_PIXELS, SAMPLE_PHOTOS, sample_image, to_rgb_array
from reme.viz import class_colors

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
DEFAULT_CLASSES = "person, sky, building, tree, road, car, cat, dog"


@dataclass
class _Result:
    image: np.ndarray
    segment_ids: np.ndarray
    label_map: np.ndarray
    segment_probs: np.ndarray
    classes: list[str]
    evidence: Any
    reference: str
    class_spec: Any


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
    out = image.astype(np.float32) * (1 - alpha) + colors[label_map] * alpha
    if outline is not None:
        m = outline
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        edge |= np.roll(edge, 1, 0) | np.roll(edge, 1, 1)
        out[m] = out[m] * 0.6 + 255 * 0.4
        out[edge] = (255, 230, 0)
    return out.clip(0, 255).astype(np.uint8)


def _hex(c) -> str:
    return "#%02x%02x%02x" % tuple(int(v) for v in c)


class DemoBackend:
    """Segmenters per reference set and the recent results of one demo server.

    Args:
        references: display name -> reference folder; the first is the default.
        image_roots: extra folders with reference source photos (evidence thumbnails).
        device: torch device for the segmenters (None: CUDA if available).
        segmenter_kwargs: passed to every [`reme.segmenter.Segmenter`][reme.segmenter.Segmenter].

    Raises:
        ValueError: no reference set given.
    """

    def __init__(self, references: Mapping[str, str | Path], *, image_roots: Sequence[str | Path] = (),
                 device: str | None = None, segmenter_kwargs: Mapping[str, Any] | None = None):
        if not references:
            raise ValueError("the demo needs at least one reference set")
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
                "max_classes": MAX_CLASSES, "max_upload_bytes": MAX_UPLOAD_BYTES}

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
                from reme.segmenter import Segmenter

                t0 = time.time()
                seg = Segmenter(self.references[name], device=self.device, **self.segmenter_kwargs)
                self._images[name] = ReferenceImages.for_reference(seg.reference, self.image_roots)
                self._segmenters[name] = seg
                logger.info("loaded reference %s from %s in %.1f s", name, self.references[name], time.time() - t0)
            return self._segmenters[name]

    def segment(self, image: np.ndarray, classes: str, reference: str | None = None) -> dict[str, Any]:
        """Segment ``image`` into ``classes`` and keep the result for `evidence`.

        Returns:
            JSON-ready dict: ``result_id``, ``width``, ``height``, ``overlay`` (PNG data URL),
            ``legend`` (class, colour, pixel fraction, largest segment score per class),
            ``num_segments``, ``seconds``, ``reference``, ``resized`` (bool).

        Raises:
            KeyError: unknown reference. ValueError: bad class list or over the limits of
            `check_classes`. BusyError: waited `QUEUE_TIMEOUT_S` for the segmenter.
        """
        check_classes(classes)
        name = reference or self.default_reference
        seg = self.segmenter(name)
        small = downscale(image)
        t0 = time.time()
        rid = uuid.uuid4().hex[:12]
        # one prediction at a time (the CPU is the bottleneck anyway), each waiting a bounded time
        if not self._lock.acquire(timeout=QUEUE_TIMEOUT_S):
            raise BusyError(f"the demo is busy with other requests (waited {QUEUE_TIMEOUT_S:.0f} s); try again")
        try:
            res = seg.predict(small, classes, return_evidence=True)
            self._results[rid] = _Result(small, res.segment_ids, res.label_map, res.segment_probs, res.classes,
                                         res.evidence, name, classes)
            while len(self._results) > MAX_RESULTS:
                self._results.popitem(last=False)
        finally:
            self._lock.release()
        secs = time.time() - t0
        colors = class_colors(len(res.classes))
        pixels = np.bincount(res.label_map.ravel(), minlength=len(res.classes))
        legend = [{"class": c, "color": _hex(colors[i]), "fraction": round(float(res.class_fractions[i]), 5),
                   "pixels": int(pixels[i]), "max_segment_score": round(float(res.segment_probs[:, i].max()), 5)}
                  for i, c in enumerate(res.classes)]
        return {"result_id": rid, "width": int(small.shape[1]), "height": int(small.shape[0]),
                "overlay": png_data_url(blend(small, res.label_map, len(res.classes))),
                "legend": legend, "num_segments": int(res.segment_probs.shape[0]), "seconds": round(secs, 2),
                "reference": name, "resized": small.shape != image.shape}

    def evidence(self, result_id: str, x: int, y: int) -> dict[str, Any]:
        """Why the segment under pixel (x, y) got its label.

        Returns:
            JSON-ready dict: ``segment``, ``class``, ``class_scores`` (P_seg row, largest
            first), ``covered``, ``votes`` (A1 row: reference label, weight, the test class
            that label speaks for most in A2 (eq. 2), and that A2 weight), ``neighbours``
            (reference id, similarity, weight, labels, source image, bbox, stage, ``thumb`` URL),
            ``highlight`` (PNG data URL with the segment outlined), ``images_readable`` (False:
            the reference photos are not found here and thumbnails are placeholders).

        Raises:
            KeyError: unknown or expired result. ValueError: (x, y) outside the image.
        """
        r = self._results.get(result_id)
        if r is None:
            raise KeyError(f"result {result_id!r} expired or unknown; segment the image again")
        h, w = r.segment_ids.shape
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"pixel ({x}, {y}) lies outside the {w}x{h} image")
        s = int(r.segment_ids[y, x])
        ref = self.segmenter(r.reference).reference
        rec = r.evidence.records(ref, [s])[0]
        for n in rec["neighbours"]:
            n["thumb"] = f"api/refcrop/{r.reference}/{n['reference_id']}.png"
        rec["votes"] = [[lab, w, *cls] for (lab, w), cls in zip(rec["votes"], self._label_to_class(r, rec["votes"]))]
        probs = r.segment_probs[s]
        order = np.argsort(-probs)
        rec.update({
            "class": r.classes[int(r.label_map[y, x])],
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
        from reme.evidence import label_class_affinity
        from reme.text_embedding import embed_labels

        if not votes:
            return []
        seg = self.segmenter(r.reference)
        ref = seg.reference
        names, synonyms = parse_classes(r.class_spec)
        flat = [x for syns in synonyms for x in syns]
        owner = [ci for ci, syns in enumerate(synonyms) for _ in syns]
        index = {lab: j for j, lab in enumerate(ref.labels)}
        rows = np.asarray(ref.L_ref, np.float32)[[index[lab] for lab, _ in votes]]
        A2 = label_class_affinity(rows, embed_labels(seg.text_encoder, flat, seg.templates),
                                  logit_scale=seg.label_logit_scale, owner=owner, num_classes=len(names))
        best = A2.argmax(axis=1)
        return [(names[b], round(float(A2[i, b]), 5)) for i, b in enumerate(best)]

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
