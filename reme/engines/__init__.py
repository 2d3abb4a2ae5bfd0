"""Engines that run the per-image stages of a reference build over shards.

* `reme.engines.local`: in the calling process or a pool of worker processes.
* `reme.engines.ray`: a Ray Data pipeline on a local or remote Ray cluster
  (``pip install "reme[ray]"``).

Both call `reme.shard_stages.ShardComputer.compute_encoded` per shard and write the
result with `reme.shards.ShardStore.write`, so their outputs are byte-identical.
"""

ENGINES = ("local", "ray")
