"""The demo's work, independent of the web framework: segment a photo, keep the result, answer
"why did this segment get its label?" with retrieval evidence ([`reme.inference.evidence`][reme.inference.evidence]),
and teach by example: label a clicked segment, re-segment with it, undo
([`Segmenter.add_examples`][reme.inference.segmenter.Segmenter.add_examples], issue 15).

Whose examples: by default each browser session (a random id in a cookie) has its own in-memory
overlay per reference set, invisible to every other session. A session takes a slot only when
it teaches (its first example); segmenting, evidence and page loads take none, so requests of
strangers cannot push a teaching session out. At most `MAX_SESSIONS` sessions teach at once; a
new one takes the slot of a session idle for `SESSION_IDLE_S`, else it is refused (503) until
one frees up. With ``overlay=DIR`` every session shares one overlay folder instead (one
reference set only), written under the segmenter lock and saved atomically after each add or
undo.

Memory is bounded by bytes (`DemoBackend.memory` measures it): a teaching session keeps its
overlay rows (at most `SESSION_ROW_BYTES`, about 1,900 rows of the default 384-d reference) and
a small JPEG thumbnail per taught row (at most `SESSION_THUMB_BYTES`, oldest dropped first);
never the taught photos' pixels (undo removes rows by example id). Recent results (the photo,
its segment and label maps, evidence) are kept for evidence and teaching while they fit in
`RESULTS_BYTES` (and `MAX_RESULTS`), oldest out first. Together: at most `MEMORY_BUDGET_BYTES`
(224 MiB) on top of the loaded reference sets and encoders.
"""

from __future__ import annotations

import hashlib
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

from reme.demo.inputs import (MAX_CLASS_CHARS, MAX_CLASS_TERMS, MAX_CLASSES, MAX_LABEL_CHARS, MAX_SIDE,  # noqa: F401
                              MAX_UPLOAD_BYTES, blend, check_classes, check_label, downscale, png_data_url,
                              with_class)
from reme.demo.sessions import (MAX_SESSIONS, ROW_OVERHEAD_BYTES, SESSION_IDLE_S, SESSION_ROW_BYTES, SESSION_THUMB_BYTES,
                                SHARED_ROW_BYTES, THUMB_QUALITY, BusyError, Sessions, decode_thumb, jpeg_thumbnail,
                                keep_thumbs, nbytes, row_key)
from reme.demo.told import coverage_entries, rule_min_support, segment_extras, unlabelled_entry, why_unlabelled
from reme.io import SAMPLE_PHOTOS, sample_image
from reme.report.crops import THUMB, ReferenceImages, placeholder_thumbnail
from reme.report.viz import class_colors

logger = logging.getLogger(__name__)

#: Results kept for evidence look-ups and teaching (LRU), and their bytes (an 800 x 800 result
#: takes 3.9 MB: photo, segment ids, label map, evidence; 5.6 MB when it searched a newly
#: taught overlay, whose merged reference tables it holds).
MAX_RESULTS = 16
RESULTS_BYTES = 96 * 2**20
#: Seconds a request waits for its turn at the segmenter before it is refused as busy.
QUEUE_TIMEOUT_S = 60.0
#: The demo's memory budget for sessions and results (encoders and reference sets not counted).
MEMORY_BUDGET_BYTES = RESULTS_BYTES + MAX_SESSIONS * (SESSION_ROW_BYTES + SESSION_THUMB_BYTES)
#: Examples one session may add (per reference set); a shared overlay takes `MAX_SHARED_EXAMPLES`.
MAX_EXAMPLES = 200
MAX_SHARED_EXAMPLES = 2000
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
    told: dict = field(default_factory=dict)  # "none of these" per-segment arrays (told.segment_extras)
    uncovered: list = field(default_factory=list)  # asked classes the reference set does not cover


def _pixels_hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:8]


def _compact(a: np.ndarray) -> np.ndarray:
    """``a`` (non-negative ints) in the smallest unsigned dtype holding it (uint8 / uint16 / int32)."""
    top = int(a.max(initial=0))
    return a.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32, copy=False)


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
        self._sessions = Sessions(MAX_SESSIONS, SESSION_IDLE_S, shared=overlay is not None)
        self._state_lock = threading.RLock()  # session segmenters (short holds, never while segmenting)
        self.references = {str(k): Path(v) for k, v in references.items()}
        self.image_roots = list(image_roots)
        self.device = device
        self.segmenter_kwargs = dict(segmenter_kwargs or {})
        self._segmenters: dict[str, Any] = {}
        self._images: dict[str, ReferenceImages] = {}
        self._results: OrderedDict[str, _Result] = OrderedDict()
        self._result_bytes: dict[str, int] = {}  # measured once, when kept
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
                t0 = time.time()
                seg = self._load(self.references[name])
                self._images[name] = ReferenceImages.for_reference(seg.reference, self.image_roots)
                self._segmenters[name] = seg
                logger.info("loaded reference %s from %s in %.1f s", name, self.references[name], time.time() - t0)
            return self._segmenters[name]

    def _load(self, path: Path):
        """A Segmenter of ``path`` whose text encoder embeds each string once
        ([`CachedTextEncoder`][reme.demo.textcache.CachedTextEncoder]): a taught label is not
        embedded again as a class, nor the other classes when the class list grows."""
        from reme.demo.textcache import CachedTextEncoder
        from reme.encoders import resolve_encoder
        from reme.inference.segmenter import Segmenter
        from reme.reference import load_reference

        kwargs = {"unlabelled": True, **self.segmenter_kwargs}  # "none of these" on, as in `reme segment`
        ref = load_reference(path)
        text = kwargs.pop("text_encoder", None) or ref.manifest.get("encoders", {}).get("text")
        if text is not None:
            text = CachedTextEncoder(resolve_encoder(text, device=self.device) if isinstance(text, str) else text)
        return Segmenter(ref, device=self.device, text_encoder=text, **kwargs)

    def _max_examples(self) -> int:
        return MAX_SHARED_EXAMPLES if self.overlay is not None else MAX_EXAMPLES

    def _row_budget(self) -> int:
        return SHARED_ROW_BYTES if self.overlay is not None else SESSION_ROW_BYTES

    def session_segmenter(self, session: str, name: str | None = None, *, teach: bool = False):
        """The Segmenter of ``session`` for reference ``name``: the reference's Segmenter with
        the session's own overlay ([`Segmenter.with_overlay`][reme.inference.segmenter.Segmenter.with_overlay]),
        or with the shared overlay folder when the backend has one. A session that never
        taught gets the reference's own Segmenter (no examples) and takes no slot, unless
        ``teach`` (then it is given one).

        Raises:
            KeyError: unknown reference name.
            CapacityError: ``teach`` and every teaching slot is in use (`SESSION_IDLE_S`).
        """
        name = name or self.default_reference
        base = self.segmenter(name)
        state = self._sessions.claim(session) if teach else self._sessions.get(session)
        if state is None:
            return base
        with self._state_lock:
            seg = state.segmenters.get(name)
            if seg is None:
                seg = state.segmenters[name] = base.with_overlay(self.overlay)
                state.records[name] = self._records(seg)
            return seg

    def memory(self) -> dict[str, int]:
        """Bytes the demo holds besides the loaded reference sets and encoders: ``sessions``
        (teaching sessions), ``rows`` (their overlay rows, estimated as float32 embedding +
        `ROW_OVERHEAD_BYTES`), ``thumbs`` (their thumbnails), ``results`` (kept results, the
        references they searched counted once), ``total`` and ``budget`` (`MEMORY_BUDGET_BYTES`)."""
        with self._state_lock:
            states = self._sessions.all()
            rows = sum(self._rows_bytes(seg) for st in states for seg in st.segmenters.values())
            thumbs = sum(st.thumb_bytes() for st in states)
            results = self._results_bytes()
        return {"sessions": len(self._sessions), "rows": rows, "thumbs": thumbs, "results": results,
                "total": rows + thumbs + results, "budget": MEMORY_BUDGET_BYTES}

    @staticmethod
    def _rows_bytes(seg) -> int:
        n = sum(int(e["rows"]) for e in seg.examples())
        return n * (int(seg.reference.S_ref.shape[1]) * 4 + ROW_OVERHEAD_BYTES)

    def _results_bytes(self) -> int:
        seen = self._shared_ids()
        return sum(nbytes(r, seen) for r in list(self._results.values()))

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
            class field), ``examples`` (number in the overlay used), ``unlabelled`` (share of
            pixels no asked class fits, `reme.demo.told.unlabelled_entry`; left uncoloured in
            the overlay), ``coverage`` (per class, `reme.demo.told.coverage_entries`: ``covered``
            False with a ``warning`` line when the reference set has no label close to it),
            ``unlabelled_rule`` (the "none of these" rule is on: the default).

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
        coverage = coverage_entries(res)
        self._keep(rid, _Result(small, _compact(res.segment_ids), res.label_map.astype(np.int16 if len(res.classes)
                                < 32768 else np.int32), res.segment_scores, res.classes, res.evidence, name, classes,
                                session, image_name, self._searched(seg, session, name), segment_extras(res),
                                [c["class"] for c in coverage if not c["covered"]]))
        secs = time.time() - t0
        colors = class_colors(len(res.classes))
        pixels = np.bincount(res.label_map[res.label_map >= 0], minlength=len(res.classes))  # -1: unlabelled
        legend = [{"class": c, "color": _hex(colors[i]), "fraction": round(float(res.class_fractions[i]), 5),
                   "pixels": int(pixels[i]), "max_segment_score": round(float(res.segment_scores[:, i].max()), 5)}
                  for i, c in enumerate(res.classes)]
        return {"result_id": rid, "width": int(small.shape[1]), "height": int(small.shape[0]),
                "overlay": png_data_url(blend(small, res.label_map, len(res.classes))),
                "legend": legend, "num_segments": int(res.segment_scores.shape[0]), "seconds": round(secs, 2),
                "reference": name, "resized": False, "classes": classes, "examples": len(seg.examples()),
                "unlabelled": unlabelled_entry(res), "coverage": coverage,
                "unlabelled_rule": bool(res.coverage is not None or res.extras.get("unlabelled_segments") is not None)}

    def _keep(self, rid: str, result: _Result) -> None:
        """Keep ``result``; the oldest go while over `MAX_RESULTS` or `RESULTS_BYTES` (the newest stays)."""
        seen = self._shared_ids() | {id(r.searched) for r in self._results.values()}  # a shared merge counts once
        self._results[rid] = result
        self._result_bytes = {k: v for k, v in self._result_bytes.items() if k in self._results}
        self._result_bytes[rid] = nbytes(result, seen)
        while len(self._results) > 1 and (len(self._results) > MAX_RESULTS
                                          or sum(self._result_bytes.values()) > RESULTS_BYTES):
            self._result_bytes.pop(self._results.popitem(last=False)[0], None)

    def _shared_ids(self) -> set:
        """Ids of the loaded reference sets and their arrays (not counted in a result's bytes)."""
        seen = {id(v) for seg in self._segmenters.values() for v in vars(seg.reference).values()}
        return seen | {id(seg.reference) for seg in self._segmenters.values()}

    def _searched(self, seg, session: str, name: str):
        """``seg.merged_reference()``, one object per session and overlay state (results share it)."""
        state = self._sessions.get(session) if seg is not self._segmenters.get(name) else None
        if state is None:
            return seg.merged_reference()
        key = tuple(e["example_id"] for e in seg.examples())
        old = state.searched.get(name)
        if old is None or old[0] != key:
            old = state.searched[name] = (key, seg.merged_reference())
        return old[1]

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
            seg = self.session_segmenter(session, r.reference, teach=True)
            state = self._sessions.get(session)
            if len(seg.examples()) >= self._max_examples():
                raise ValueError(f"this {'shared overlay' if self.overlay else 'session'} holds "
                                 f"{self._max_examples()} examples, the demo's limit; undo some first")
            t0 = time.time()
            image_name = f"demo:{r.image_name}#{_pixels_hash(r.image)}"
            eid = seg.add_examples(r.image, [int(segment_id)], label, image_name=image_name,
                                   save=self.overlay is not None)
            if not eid:  # cannot happen for a segment of the result; said plainly if it does
                raise ValueError(f"segment {segment_id} selects no pixels of the photo")
            if self.overlay is None and self._rows_bytes(seg) > self._row_budget():
                seg.remove_examples(eid)
                raise ValueError(f"this session's examples would take more than {self._row_budget() / 2**20:.0f} MiB, "
                                 "the demo's limit; undo some first")
            self._thumbnails(state, seg, r.image, image_name)
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
            state = self._sessions.get(session)
            if state is None:
                raise KeyError("this session has taught no examples")
            seg = self.session_segmenter(session, name)
            n = seg.remove_examples(example_id or None, save=self.overlay is not None)
            self._thumbnails(state, seg)
            records = state.records[name] = self._records(seg)
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
        state = self._sessions.get(session)
        if state is None:
            return []  # a page load or a segmentation takes no teaching slot
        self.session_segmenter(session, name)
        return list(state.records[name])  # a snapshot, updated under the lock

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

    def _thumbnails(self, state, seg, image: np.ndarray | None = None, image_name: str = "") -> None:
        """Thumbnails of the taught rows: new ones of ``image_name`` cut from ``image`` (JPEG);
        those of rows no longer taught dropped; the oldest dropped over `SESSION_THUMB_BYTES`."""
        ref, m = seg.merged_reference(), seg.reference.num_segments
        keys = [row_key(ref.segment_image[i], ref.segment_bbox[i]) for i in range(m, ref.num_segments)]
        for k in keys:
            if image is not None and k[0] == image_name and k not in state.thumbs:
                state.thumbs[k] = jpeg_thumbnail(image, k[1:], quality=THUMB_QUALITY)
        for other in (x for x in state.segmenters.values() if x is not seg):  # other reference sets
            ref, m = other.merged_reference(), other.reference.num_segments
            keys += [row_key(ref.segment_image[i], ref.segment_bbox[i]) for i in range(m, ref.num_segments)]
        keep_thumbs(state, keys, SESSION_THUMB_BYTES)

    def evidence(self, result_id: str, x: int, y: int, session: str = "") -> dict[str, Any]:
        """Why the segment under pixel (x, y) got its label.

        Returns:
            JSON-ready dict: ``segment``, ``class`` (None: unlabelled, "none of these"),
            ``unlabelled`` (None, or why: `reme.demo.told.why_unlabelled`), ``can_label`` (the
            segment can be taught with `add_example`), ``class_scores`` (P_seg row, largest
            first), ``covered``, ``votes`` (A1 row: reference label, weight, the test class
            that label speaks for most in A2 (eq. 2), and that A2 weight), ``neighbours``
            (reference id, similarity, weight, labels, source image, bbox, stage (``example``
            for a taught segment), ``thumb``: a crop's URL, or None when its photo is not here),
            ``highlight`` (PNG data URL with the segment outlined), ``images_readable`` (False: no
            folder of the reference photos is found here), ``photos_hint`` (one line on how to
            show the missing crops, "" when none is missing).

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
        state, images = self._sessions.get(session), self._images[r.reference]
        for n in rec["neighbours"]:
            rid = n["reference_id"]
            if rid < m:
                shown = images.path(r.searched.segment_image[rid]) is not None
                n["thumb"] = f"api/refcrop/{r.reference}/{rid}.png" if shown else None
            else:
                key = row_key(r.searched.segment_image[rid], r.searched.segment_bbox[rid])
                shown = state is not None and key in state.thumbs
                n["thumb"] = f"api/examplecrop/{result_id}/{rid}.png" if shown else None
            if n.get("image", "").startswith("demo:"):
                n["image"] = n["image"][5:].rsplit("#", 1)[0]
        missing = any(n["thumb"] is None and n["reference_id"] < m for n in rec["neighbours"])
        rec["votes"] = [[lab, w, *cls] for (lab, w), cls in zip(rec["votes"], self._label_to_class(r, rec["votes"]))]
        probs = r.segment_scores[s]
        order = np.argsort(-probs)
        unlabelled = int(r.label_map[y, x]) < 0                                   # "none of these"
        rec.update({
            "class": None if unlabelled else r.classes[int(r.label_map[y, x])],
            "unlabelled": why_unlabelled(r.told, s, probs, rule_min_support(self.segmenter(r.reference)),
                                         r.uncovered) if unlabelled else None,
            "can_label": True,  # "Label this as" (add_example) takes any segment, unlabelled ones too
            "class_scores": [[r.classes[i], round(float(probs[i]), 5)] for i in order],
            "area": int((r.segment_ids == s).sum()),
            "highlight": png_data_url(blend(r.image, r.label_map, len(r.classes), outline=r.segment_ids == s)),
            "logit_scale": r.evidence.logit_scale, "support": r.evidence.support,
            "images_readable": images.readable,
            "photos_hint": self._photos_hint(r.reference) if missing else "",
        })
        return rec

    def _photos_hint(self, name: str) -> str:
        """One line: how to show crops of a reference set whose photos are not here."""
        root = self.segmenter(name).reference.manifest.get("image_root") or "the folder of its photos"
        return (f"No crops: the photos this reference set was built from are not here (manifest image_root: "
                f"{root}); to show them, start the demo with --image-root DIR for each such folder.")

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
        """Thumbnail of a taught segment (an overlay row) that a kept result searched: the crop
        cut when it was taught while the session keeps it, else a placeholder tile.

        Raises:
            KeyError: unknown or expired result. IndexError: not an overlay row of that result.
        """
        r = self._result(result_id, session)
        m = self.segmenter(r.reference).reference.num_segments
        ref = r.searched
        if not m <= segment_id < ref.num_segments:
            raise IndexError(f"segment id {segment_id} is not a taught segment ([{m}, {ref.num_segments}))")
        name = ref.segment_image[segment_id]
        state = self._sessions.get(session)
        data = state.thumbs.get(row_key(name, ref.segment_bbox[segment_id])) if state is not None else None
        if data is None:
            return placeholder_thumbnail(size, "thumbnail dropped", name.removeprefix("demo:").rsplit("#", 1)[0])
        tile = decode_thumb(data)
        return tile if tile.width == size else tile.resize((size, size))

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
