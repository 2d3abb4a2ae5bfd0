"""Teaching sessions of the demo: who holds a slot, what each keeps, and how many bytes.

A session takes a slot only when it teaches ([`Sessions.claim`][reme.demo.sessions.Sessions.claim]);
a full table gives the slot of a session idle for ``idle_s`` seconds to the newcomer, else refuses
([`CapacityError`][reme.demo.sessions.CapacityError]), so a stranger's requests never push out a
session in use. A session keeps its overlay rows (in its Segmenter copy) and a small JPEG
thumbnail per taught row, never the taught photo's pixels.
"""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Iterable

import numpy as np
from PIL import Image

from reme.report.crops import THUMB, crop_thumbnail

#: Sessions teaching at once (each holds a shallow Segmenter copy per reference set: shared
#: encoders and reference, its own overlay rows).
MAX_SESSIONS = 32
#: Seconds without a request after which a teaching session's slot may go to a new one (its
#: examples are then forgotten).
SESSION_IDLE_S = 3600.0
#: Bytes of overlay rows one session may hold (an example beyond it is refused; undo some first),
#: and of its taught rows' thumbnails (oldest dropped first; they then show as a placeholder).
#: A shared overlay (``--overlay``) takes `SHARED_ROW_BYTES` of rows.
SESSION_ROW_BYTES = 3 * 2**20
SESSION_THUMB_BYTES = 2**20
SHARED_ROW_BYTES = 64 * 2**20
#: Bytes per overlay row besides its float32 embedding (label id, box, area, image name; an
#: estimate).
ROW_OVERHEAD_BYTES = 96
#: JPEG quality of the thumbnails of taught rows (about 4 KB each at `reme.report.crops.THUMB` pixels).
THUMB_QUALITY = 85


class BusyError(RuntimeError):
    """The segmenter stayed busy too long; the request should be retried later."""


class CapacityError(BusyError):
    """Every teaching slot is taken by a session active within the idle time (retry later)."""


@dataclass
class Session:
    """One teaching session: its Segmenter copy (own overlay) per reference set, JPEG thumbnails
    of its taught rows, and the reference its latest results searched (shared by them)."""

    segmenters: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)                # reference name -> `examples` answer
    thumbs: OrderedDict = field(default_factory=OrderedDict)   # (image, x, y, w, h) -> JPEG bytes
    searched: dict = field(default_factory=dict)               # reference name -> (example ids, ReferenceSet)
    used: float = field(default_factory=time.monotonic)

    def thumb_bytes(self) -> int:
        return sum(len(b) for b in self.thumbs.values())


class Sessions:
    """The teaching sessions of one server (thread-safe).

    Args:
        max_sessions: slots.
        idle_s: seconds without a request after which a slot may be given to a new session.
        shared: one session for everybody (a shared overlay folder); no slots.
    """

    def __init__(self, max_sessions: int, idle_s: float, *, shared: bool = False):
        self.max_sessions, self.idle_s = int(max_sessions), float(idle_s)
        self.shared = Session() if shared else None
        self._table: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.RLock()

    def __contains__(self, sid: str) -> bool:
        return self.shared is not None or sid in self._table

    def __len__(self) -> int:
        return len(self._table)

    def all(self) -> list[Session]:
        with self._lock:
            return ([self.shared] if self.shared is not None else []) + list(self._table.values())

    def get(self, sid: str) -> Session | None:
        """The session ``sid`` holds (the shared one if any), or None; marks it used."""
        if self.shared is not None:
            return self.shared
        with self._lock:
            state = self._table.get(sid)
            if state is not None:
                state.used = time.monotonic()
                self._table.move_to_end(sid)
            return state

    def claim(self, sid: str) -> Session:
        """The session ``sid``, given a slot if it has none.

        Raises:
            CapacityError: every slot is held by a session used within ``idle_s`` seconds.
        """
        with self._lock:
            state = self.get(sid)
            if state is not None:
                return state
            if len(self._table) >= self.max_sessions:
                oldest, old = next(iter(self._table.items()))       # least recently used first
                if time.monotonic() - old.used < self.idle_s:
                    raise CapacityError(f"the demo already holds {self.max_sessions} teaching sessions, all in use "
                                        f"within the last {self.idle_s / 60:.0f} minutes; try again later")
                del self._table[oldest]
            state = self._table[sid] = Session()
            return state


def jpeg_thumbnail(image: np.ndarray, bbox, size: int = THUMB, quality: int = 85) -> bytes:
    """JPEG bytes of [`crop_thumbnail`][reme.report.crops.crop_thumbnail] of ``bbox`` (XYWH) in
    ``image`` ((H, W, 3) uint8); about 4 KB at 112 px."""
    buf = io.BytesIO()
    crop_thumbnail(image, bbox, size).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def row_key(image_name: str, bbox) -> tuple:
    """The key of a taught row's thumbnail: its source image name and XYWH box."""
    return (str(image_name), *(int(v) for v in bbox))


def keep_thumbs(state: Session, keys: Iterable[tuple], budget: int) -> None:
    """Drop thumbnails of rows no longer taught (not in ``keys``), then the oldest while the
    session's thumbnails take more than ``budget`` bytes."""
    keep = set(keys)
    for k in [k for k in state.thumbs if k not in keep]:
        del state.thumbs[k]
    total = state.thumb_bytes()
    while state.thumbs and total > budget:
        total -= len(state.thumbs.popitem(last=False)[1])


def nbytes(obj: Any, seen: set | None = None, depth: int = 0) -> int:
    """Bytes held by the NumPy arrays, tensors, bytes and strings of ``obj`` (a dataclass or an
    object with ``__dict__``, lists, tuples, dicts; each object counted once per ``seen``)."""
    seen = set() if seen is None else seen
    if obj is None or id(obj) in seen or depth > 4:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        base = obj
        while isinstance(base, np.ndarray):
            if isinstance(base, np.memmap):
                return 0                                                    # file pages, not heap
            base = base.base
        return int(obj.nbytes) if obj.base is None or id(obj.base) not in seen else 0
    if isinstance(obj, (bytes, bytearray, str)):
        return len(obj)
    if hasattr(obj, "element_size") and hasattr(obj, "nelement"):          # a torch tensor
        return int(obj.element_size() * obj.nelement())
    if isinstance(obj, dict):
        return sum(nbytes(k, seen, depth + 1) + nbytes(v, seen, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):  # strings in lists (image names, labels) are shared: pointers only
        if not obj or isinstance(obj[0], str):
            return 8 * len(obj)
        return sum(nbytes(v, seen, depth + 1) for v in obj) + 8 * len(obj)
    if is_dataclass(obj):
        return sum(nbytes(getattr(obj, f.name), seen, depth + 1) for f in fields(obj))
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(nbytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


def decode_thumb(data: bytes) -> Image.Image:
    """The PIL image of a stored thumbnail."""
    return Image.open(io.BytesIO(data)).convert("RGB")
