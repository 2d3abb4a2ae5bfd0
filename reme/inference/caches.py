"""Thread-safe caches of the [`Predictor`][reme.inference.predictor.Predictor]: values that depend
only on their key, kept least recently used out."""

from __future__ import annotations

import threading

from cachetools import LRUCache


class LockedLRU:
    """A ``cachetools.LRUCache`` behind a lock: ``get_or_make(key, make)``; ``make`` runs outside
    the lock (two threads missing the same key at once both compute it; the values are equal)."""

    def __init__(self, maxsize: int):
        self.cache = LRUCache(maxsize=max(int(maxsize), 1)) if maxsize > 0 else None
        self.lock = threading.Lock()

    def __len__(self) -> int:
        with self.lock:
            return 0 if self.cache is None else len(self.cache)

    def get_or_make(self, key, make):
        """The cached value of ``key``, else ``make()`` (stored)."""
        if self.cache is not None:
            with self.lock:
                hit = self.cache.get(key)
            if hit is not None:
                return hit
        value = make()
        if self.cache is not None:
            with self.lock:
                self.cache[key] = value
        return value
