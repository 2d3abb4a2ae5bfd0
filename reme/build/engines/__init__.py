"""Engines that run the per-image stages of a reference build over shards.

* `reme.build.engines.local`: in the calling process or a pool of worker processes.
* `reme.build.engines.ray`: a Ray Data pipeline on a local or remote Ray cluster
  (``pip install "reme[ray]"``).

Both call `reme.build._shard_stages.ShardComputer.compute_encoded` per shard and write the
result with `reme.build._shards.ShardStore.write`, so their outputs are byte-identical.
"""

ENGINES = ("local", "ray")
