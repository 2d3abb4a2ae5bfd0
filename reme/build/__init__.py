"""Building a reference set (Part 1 of the method): captions or ground truth -> noun phrases ->
proposals -> label pairing -> group filter -> ambiguous-label filter -> synonyms -> Parquet,
FAISS index and manifest.

The entry points are in [`reme.build.pipeline`][reme.build.pipeline]
(`build_caption_reference`, `build_gt_reference`); the per-image stages run in shards
(`reme.build._shard_stages`), the whole-set stages 7-9 once over all shards
(`reme.build._global_stages`), on a local pool or Ray (`reme.build.engines`).
"""

from reme.build._global_stages import ArrayReader, FilteredPairs, filter_pairs

__all__ = ["ArrayReader", "FilteredPairs", "filter_pairs"]
