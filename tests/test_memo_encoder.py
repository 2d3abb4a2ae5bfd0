"""eval.protocol.MemoVisualEncoder: an LRU of dense features keyed by pixels, shared by threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from reme.eval.protocol import MemoVisualEncoder


class _Counting:
    dim = 3

    def __init__(self):
        self.calls = 0

    def dense_features(self, image):
        self.calls += 1
        return torch.full((2, 2, 3), float(image.sum()))


def test_memo_remembers_the_last_images_and_evicts_the_oldest():
    enc = _Counting()
    memo = MemoVisualEncoder(enc, size=2)
    a, b, c = (np.full((4, 4, 3), v, np.uint8) for v in (1, 2, 3))
    fa = memo.dense_features(a)
    assert memo.dense_features(a.copy()) is fa and enc.calls == 1          # same pixels, one forward
    memo.dense_features_batch([b, c])                                     # a is now the oldest: evicted
    assert enc.calls == 3
    memo.dense_features(a)
    assert enc.calls == 4 and memo.dim == 3                               # other attributes pass through
    enc0 = _Counting()
    none = MemoVisualEncoder(enc0, size=0)
    none.dense_features(a)
    none.dense_features(a)
    assert enc0.calls == 2


def test_memo_shared_by_threads():
    enc = _Counting()
    memo = MemoVisualEncoder(enc, size=4)
    imgs = [np.full((4, 4, 3), v, np.uint8) for v in range(4)]

    def work(_):
        return [float(memo.dense_features(im)[0, 0, 0]) for _ in range(50) for im in imgs]

    with ThreadPoolExecutor(4) as pool:                 # a worker's exception is re-raised by list()
        got = list(pool.map(work, range(4)))
    assert all(g == [float(im.sum()) for _ in range(50) for im in imgs] for g in got)
    assert enc.calls <= 4 * 4                          # at most one forward per image and thread
