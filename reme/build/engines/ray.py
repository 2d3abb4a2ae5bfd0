"""Ray engine: the per-image stages as a Ray Data pipeline, for clusters.

Pipeline: ``from_items`` (one row per pending shard: index + image keys as JSON) ->
``map_batches`` with a pool of actors (`ShardActor`; each loads the encoders once,
with ``num_gpus`` per actor on GPU clusters) that read the images and compute the shard ->
the driver streams the results (``iter_batches``) and writes the shard files. The global stages
then run on the driver (`reme.build._global_stages`). Actors compute exactly what the local
engine computes (`reme.build._shard_stages.ShardComputer.compute_encoded`), so the output is
byte-identical.

Nothing is pickled by reme: actors get a JSON string (encoder specs, settings, paths) and
return Arrow tables of integers, strings and Parquet bytes. (Ray's own task plumbing
serialises internally between its processes; no file is ever read with pickle.)

Requirements on a cluster: ``reme`` (``pip install "reme[ray]"``) and the encoder weights
installed on every node, and the image folder (and caption / annotation files) readable at
the same path on every node, e.g. a shared file system. The work and output folders are
written by the driver only.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Sequence

from reme.build._shards import ShardStore

logger = logging.getLogger(__name__)


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError('the Ray engine needs Ray Data: pip install "reme[ray]"') from exc
    return ray


class ShardActor:
    """Ray Data callable class: rebuilds a ShardComputer from its JSON recipe once, then
    maps batches of shard rows (``shard`` int64, ``keys`` JSON string) to result rows
    (``shard``, ``segments`` and ``pairs`` Parquet bytes, ``meta`` JSON string)."""

    def __init__(self, config_json: str):
        import torch

        from reme.build._shard_stages import ShardComputer

        torch.set_num_threads(1)
        self.computer = ShardComputer.from_config(json.loads(config_json))

    def __call__(self, batch):
        import pyarrow as pa

        cols: dict[str, list] = {"shard": [], "segments": [], "pairs": [], "meta": []}
        for index, keys in zip(batch.column("shard").to_pylist(), batch.column("keys").to_pylist()):
            seg, pairs, meta = self.computer.compute_encoded(int(index), json.loads(keys))
            cols["shard"].append(int(index))
            cols["segments"].append(seg)
            cols["pairs"].append(pairs)
            cols["meta"].append(json.dumps(meta, sort_keys=True))
        return pa.table({"shard": pa.array(cols["shard"], pa.int64()), "segments": pa.array(cols["segments"], pa.binary()),
                         "pairs": pa.array(cols["pairs"], pa.binary()), "meta": pa.array(cols["meta"], pa.string())})


def run_ray(store: ShardStore, tasks: Sequence[tuple[int, list[str]]], config: dict[str, Any], *,
            workers: int = 1, address: str | None = None, num_gpus: float | None = None,
            on_done: Callable[[dict[str, Any]], None] = lambda meta: None) -> None:
    """Compute the shards ``tasks`` on Ray and write them from the driver.

    Args:
        store: the work folder (on the driver).
        tasks: [(shard index, image keys), ...] still to do.
        config: `reme.build._shard_stages.ShardComputer.config` (plain JSON-able dict).
        workers: size of the actor pool.
        address: Ray cluster address (``"auto"``, ``"ray://head:10001"``); None connects to
            an already initialised Ray or starts a local one (stopped again at the end).
        num_gpus: GPUs per actor (default 1 when ``config["device"]`` is CUDA, else 0).
        on_done: called with each finished shard's marker dict.

    Raises:
        ImportError: Ray is not installed.
        reme.build._shards.ShardWriteError: a shard could not be written.
    """
    if not tasks:
        return
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if address:
            kwargs["address"] = address
        ray.init(**kwargs)
        started = True
    try:
        if num_gpus is None:
            num_gpus = 1.0 if str(config.get("device", "cpu")).startswith("cuda") else 0.0
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([{"shard": int(i), "keys": json.dumps(list(k))} for i, k in tasks],
                                 override_num_blocks=len(tasks))
        ds = ds.map_batches(ShardActor, fn_constructor_kwargs={"config_json": json.dumps(config)}, batch_size=1,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=max(1, workers)),
                            num_cpus=1, num_gpus=num_gpus or None)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for index, seg, pairs, meta in zip(batch.column("shard").to_pylist(), batch.column("segments").to_pylist(),
                                               batch.column("pairs").to_pylist(), batch.column("meta").to_pylist()):
                meta = json.loads(meta)
                store.write(int(index), seg, pairs, meta)
                on_done(meta)
    finally:
        if started:
            ray.shutdown()
