"""A text encoder that embeds each string once (the demo's teach loop, issue 20).

"Label this as rug" embeds the label's template strings twice without it: once for the new
overlay row's L_ref entry (docs/method.md step 5) and again as a class column of L_test when
the photo is segmented again (eq. 2); and a class list that grew by one name re-embeds every
class. The demo wraps its segmenters' text encoder in
[`CachedTextEncoder`][reme.demo.textcache.CachedTextEncoder], so each string reaches the
model once per server.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from reme.encoders.base import TextEncoder


class CachedTextEncoder(TextEncoder):
    """``inner`` with a memory: the embedding of every string it encoded (least recently used
    out past ``max_texts``). Same ``spec`` and ``dim`` as ``inner``; rows are identical to
    ``inner.encode``'s for the same string, since each string's embedding does not depend on
    the others of its batch (texts do not attend to each other; padding changes rows by float
    rounding only).

    Args:
        inner: the text encoder.
        max_texts: strings kept (each a ``dim`` float32 row: 4096 x 384-d = 6 MiB).

    Attributes:
        encoded (int): strings sent to ``inner`` so far (the cache misses).
    """

    def __init__(self, inner: TextEncoder, max_texts: int = 4096):
        self.inner = inner
        self.spec, self.dim = inner.spec, int(inner.dim)
        self.max_texts = int(max_texts)
        self.encoded = 0
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 unit rows of ``texts`` (see `TextEncoder.encode`)."""
        texts = [str(t) for t in texts]
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for t in texts:
                row = self._rows.get(t)
                if row is not None:
                    self._rows.move_to_end(t)
                    found[t] = row
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            emb = np.asarray(self.inner.encode(missing), np.float32)
            found.update(zip(missing, emb))
            with self._lock:
                self.encoded += len(missing)
                self._rows.update(zip(missing, emb))
                while len(self._rows) > self.max_texts:
                    self._rows.popitem(last=False)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([found[t] for t in texts]).astype(np.float32, copy=False)

    def __getattr__(self, name: str) -> Any:  # model, device, ... of the wrapped encoder
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
