"""Two threads calling `predict` at once (issue 21): the same label maps and scores as a serial
run, and the process keeps its torch thread count: no library code calls torch.set_num_threads
(main's ``retrieval._serial`` did, saving and restoring it around element-wise work, so two
threads could leave the process on one)."""

from __future__ import annotations

import threading

import numpy as np
import torch

from conftest import REPO, photo
from reme.inference.segmenter import Segmenter


def test_predict_from_two_threads_equals_serial_and_keeps_thread_count(monkeypatch):
    calls = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n) or real_set(n))
    seg = Segmenter(REPO / "reference_sets" / "default", device="cpu", view_cache_size=0)
    images = [photo("coffee")[::4, ::4].copy(), photo("astronaut")[::4, ::4].copy()]
    classes = ["person", "cup", "table", "sky"]
    threads_before = torch.get_num_threads()
    serial = [seg.predict(img, classes) for img in images]
    results: list = [None, None]
    errors: list = []
    start = threading.Barrier(2)

    def run(i):
        try:
            start.wait()
            for _ in range(2):
                results[i] = seg.predict(images[i], classes)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got.label_map, want.label_map)
        np.testing.assert_array_equal(got.segment_scores, want.segment_scores)
    assert torch.get_num_threads() == threads_before
    assert calls == []                            # no library code touches the process-wide setting
