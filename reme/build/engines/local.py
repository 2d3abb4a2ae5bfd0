"""Local engine: shards computed in this process or in a pool of worker processes.

Each worker owns whole shards: it reads the images, runs every CPU stage (decoding,
Felzenszwalb, spaCy ``nlp.pipe``) and the batched encoder/captioner forwards, and writes the
shard files itself; only shard indices, image keys and small marker dicts cross process
boundaries. Workers start with ``fork`` on CPU (they inherit the loaded encoders, nothing is
rebuilt) and with ``spawn`` when an encoder lives on a GPU (CUDA cannot be forked): spawned
workers rebuild the encoders from `reme.build._shard_stages.ShardComputer.config`.

On a CPU every build runs its shards in worker processes, one torch thread each, even with one
worker: matrix products on 1 and 2 threads differ in the last bits, so this is what makes the
files independent of the worker count, and N workers use N cores (1.9x the throughput of one
worker with two, docs/building.md). (An in-process path under ``threadpoolctl`` did not limit
torch once an entry point had called ``torch.set_num_threads``: it ran on every core.) With the
encoders on a GPU, one worker computes in this process.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence

import torch
from threadpoolctl import threadpool_limits

from reme.build._shard_stages import ShardComputer
from reme.build._shards import ShardStore

logger = logging.getLogger(__name__)

_INHERITED: ShardComputer | None = None   # set in the parent just before fork
_WORKER: ShardComputer | None = None
_STORE: ShardStore | None = None


def default_start_method(device: str) -> str:
    """``"fork"`` for CPU devices where available, else ``"spawn"``."""
    return "fork" if not str(device).startswith("cuda") and "fork" in mp.get_all_start_methods() else "spawn"


def _init_worker(config_json: str | None, work_dir: str) -> None:
    global _WORKER, _STORE
    torch.set_num_threads(1)                        # this process is the worker's entry point
    threadpool_limits(limits=1)                     # NumPy's BLAS and OpenMP as well, for good
    _WORKER = _INHERITED if config_json is None else ShardComputer.from_config(json.loads(config_json))
    _STORE = ShardStore(work_dir)


def _run_shard(index: int, keys: list[str]) -> dict[str, Any]:
    seg, pairs, meta = _WORKER.compute_encoded(index, keys)
    _STORE.write(index, seg, pairs, meta)
    return meta


def run_local(store: ShardStore, tasks: Sequence[tuple[int, list[str]]], computer: ShardComputer, *,
              workers: int = 1, start_method: str | None = None, device: str = "cpu",
              on_done: Callable[[dict[str, Any]], None] = lambda meta: None) -> None:
    """Compute and write the shards ``tasks`` = [(index, image keys), ...].

    Args:
        store: the work folder.
        tasks: shards still to do.
        computer: the per-image stages (used directly, or inherited / rebuilt by workers).
        workers: size of the process pool (each process on one torch thread); with ``spawn``
            (encoders on a GPU) 1 computes in this process.
        start_method: ``"fork"`` or ``"spawn"`` (default `default_start_method`).
        device: the encoders' device (chooses the default start method).
        on_done: called with each finished shard's marker dict, in completion order.

    Raises:
        reme.build._shards.ShardWriteError: a shard could not be written (earlier shards are intact).
        RuntimeError: a worker process died (e.g. killed for memory).
    """
    global _INHERITED
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not tasks:
        return
    method = start_method or default_start_method(device)
    if workers == 1 and method == "spawn":          # encoders on a GPU: compute here, no second copy
        for index, keys in tasks:
            seg, pairs, meta = computer.compute_encoded(index, keys)
            store.write(index, seg, pairs, meta)
            on_done(meta)
        return
    config = None if method == "fork" else json.dumps(computer.config(device))
    _INHERITED = computer if method == "fork" else None
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=mp.get_context(method),
                                 initializer=_init_worker, initargs=(config, str(store.root))) as pool:
            futures = [pool.submit(_run_shard, index, list(keys)) for index, keys in tasks]
            try:
                for fut in as_completed(futures):
                    on_done(fut.result())
            except BrokenProcessPool as exc:
                raise RuntimeError("a build worker process died (out of memory?); finished shards are kept: "
                                   "re-run the same command, with fewer --workers, to resume") from exc
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        _INHERITED = None
