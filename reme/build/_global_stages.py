"""Global stages of a reference build over finished shards, with bounded memory.

Caption mode: group-median filter (docs/method.md step 7), ambiguous-label knee filter (step 8),
synonym enrichment (step 9), then assembly of {S_ref, O_ref, L_ref} (step 10). GT mode only
assembles.

Memory: the pair table (segment id, label, root, head: strings and integers, no embeddings)
is held in Arrow arrays. Embeddings are read from the shards' ``embedding`` column only when
needed: the group filter packs root groups into passes of at most ``budget_rows`` member
rows and reads, per pass, only those groups' segments (one shard file at a time); the final
assembly reads only the kept segments. Peak memory is therefore about the final reference set
(which retrieval holds in RAM anyway) + the largest pass + one shard, not every proposal of
every image. A single root group larger than the budget is read as one pass (its median needs
all its members).

Steps 7-9 are written once, in `filter_pairs` (over any reader: `ShardReader` for shards,
`ArrayReader` for arrays in memory); the group filter and relabelling read embeddings through
[`reme.build.filtering.group_median_filter`][reme.build.filtering.group_median_filter] and
[`reme.build.filtering.relabel_dropped`][reme.build.filtering.relabel_dropped] in passes of at
most ``budget_rows`` rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reme.build.filtering import (KNEE_MAX_RANK, KNEE_MAX_REMOVED_SHARE, KNEE_MIN_RATIO, clip_score_filter,
                                  group_median_filter, knee_cut, relabel_dropped)
from reme.build.nounphrases import NounPhrase, substitute_root
from reme.reference import ReferenceSet
from reme.build._shards import ShardStore
from reme.build.synonyms import synonym_pairs
from reme.encoders.text import embed_labels

logger = logging.getLogger(__name__)


class ShardReader:
    """Random access to the segments of finished shards by global segment id.

    Global ids number the segments of shard 0, then shard 1, ... in file order.

    Args:
        store: the `reme.build._shards.ShardStore`.
        n_shards: number of shards.
        dim: visual embedding size d.
    """

    def __init__(self, store: ShardStore, n_shards: int, dim: int):
        self.store = store
        self.n_shards = n_shards
        self.dim = dim
        counts = [int(store.read_meta(i)["segments"]) for i in range(n_shards)]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def num_segments(self) -> int:
        return int(self.offsets[-1])

    def pairs(self) -> pa.Table:
        """All pairs: ``segment`` (global id, int64), ``label``, ``root``, ``head``."""
        parts = []
        for i in range(self.n_shards):
            t = self.store.read_table(i, "pairs", ["segment", "label", "root", "head"])
            seg = pc.add(t.column("segment"), pa.scalar(int(self.offsets[i]), pa.int64()))
            parts.append(t.set_column(0, "segment", seg))
        if not parts:
            return pa.table({"segment": pa.array([], pa.int64()), "label": pa.array([], pa.string()),
                             "root": pa.array([], pa.string()), "head": pa.array([], pa.string())})
        return pa.concat_tables(parts).combine_chunks()

    def pair_scores(self) -> np.ndarray:
        """(p,) float32 CLIP pairing score of every pair, in `pairs` order (NaN if absent)."""
        parts = []
        for i in range(self.n_shards):
            t = self.store.read_table(i, "pairs", ["score"])
            parts.append(t.column("score").to_numpy(zero_copy_only=False).astype(np.float32))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _by_shard(self, rows: np.ndarray):
        """Yield (shard, positions in ``rows``, local rows) for sorted global ``rows``."""
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        bounds = np.searchsorted(shard_of, np.arange(self.n_shards + 1))
        for s in range(self.n_shards):
            a, b = bounds[s], bounds[s + 1]
            if a < b:
                yield s, slice(a, b), rows[a:b] - self.offsets[s]

    def embeddings(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), d) float32 embeddings of sorted, unique global ``rows``; reads only the
        ``embedding`` column of the shards that hold them, one shard at a time, into ``out``
        (e.g. a memory map; default a new array)."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32) if out is None else out
        for s, pos, local in self._by_shard(rows):
            col = self.store.read_table(s, "segments", ["embedding"]).column("embedding").combine_chunks()
            out[pos] = col.values.to_numpy(zero_copy_only=False).reshape(-1, self.dim)[local]
        return out

    def metadata(self, rows: np.ndarray) -> dict[str, Any]:
        """``image`` (list), ``bbox`` ((n, 4) int32), ``area`` ((n,) int64), ``source`` (list)
        of sorted, unique global ``rows``."""
        rows = np.asarray(rows, np.int64)
        image: list[str] = [""] * len(rows)
        source: list[str] = [""] * len(rows)
        bbox = np.zeros((len(rows), 4), np.int32)
        area = np.zeros(len(rows), np.int64)
        for s, pos, local in self._by_shard(rows):
            t = self.store.read_table(s, "segments", ["image", "bbox", "area", "source"])
            idx = pa.array(local)
            image[pos] = t.column("image").take(idx).to_pylist()
            source[pos] = t.column("source").take(idx).to_pylist()
            bbox[pos] = t.column("bbox").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, 4)[local]
            area[pos] = t.column("area").to_numpy()[local]
        return {"image": image, "bbox": bbox, "area": area, "source": source}


class ArrayReader:
    """The `ShardReader` interface over in-memory arrays, so that code holding all
    embeddings (the ablation runner, benchmarks, tests) runs the build's own global stages.

    Args:
        S: (m, d) float visual segment embeddings, L2-normalised (e.g. a reference's S_ref).
        pair_segment: (p,) int64 segment row of each pair.
        labels, roots: p label strings and their root nouns.
        heads: p head surface texts (default: the roots).
        scores: (p,) CLIP pairing scores (default NaN).
        image, bbox, area, source: per-segment metadata (defaults: empty / zeros / "array").
    """

    def __init__(self, S: np.ndarray, pair_segment: np.ndarray, labels: Sequence[str], roots: Sequence[str], *,
                 heads: Sequence[str] | None = None, scores: np.ndarray | None = None,
                 image: Sequence[str] | None = None, bbox: np.ndarray | None = None, area: np.ndarray | None = None,
                 source: Sequence[str] | None = None):
        self.S = S
        self.dim = int(S.shape[1])
        m = int(S.shape[0])
        self._pairs = pa.table({"segment": pa.array(np.asarray(pair_segment, np.int64)),
                                "label": pa.array(list(labels), pa.string()),
                                "root": pa.array(list(roots), pa.string()),
                                "head": pa.array(list(roots if heads is None else heads), pa.string())})
        p = self._pairs.num_rows
        self._scores = np.full(p, np.nan, np.float32) if scores is None else np.asarray(scores, np.float32)
        self._image = list(image) if image is not None else [""] * m
        self._bbox = np.zeros((m, 4), np.int32) if bbox is None else np.asarray(bbox, np.int32)
        self._area = np.zeros(m, np.int64) if area is None else np.asarray(area, np.int64)
        self._source = list(source) if source is not None else ["array"] * m

    @property
    def num_segments(self) -> int:
        return int(self.S.shape[0])

    def pairs(self) -> pa.Table:
        return self._pairs

    def pair_scores(self) -> np.ndarray:
        return self._scores

    def embeddings(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32) if out is None else out
        out[:] = self.S[rows]
        return out

    def metadata(self, rows: np.ndarray) -> dict[str, Any]:
        rows = np.asarray(rows, np.int64)
        return {"image": [self._image[i] for i in rows.tolist()], "bbox": self._bbox[rows],
                "area": self._area[rows], "source": [self._source[i] for i in rows.tolist()]}


def assemble(reader: ShardReader, pair_segment: np.ndarray, labels: pa.Array, roots: pa.Array, text_encoder,
             templates: Sequence[str], *, label_batch: int = 1024, memmap_path: Path | None = None,
             memmap_above_bytes: float = 1 << 30) -> ReferenceSet:
    """Deduplicate labels and pairs, drop unlabelled segments, embed L_ref (step 10).

    Label ids follow the order of first appearance in ``labels``; pairs keep the order of their
    first occurrence; kept segments keep global-id order.

    Args:
        reader: shard access.
        pair_segment: (p,) global segment ids.
        labels, roots: p label strings and their root nouns (Arrow string arrays).
        text_encoder: TextEncoder for L_ref; templates: step 5 templates.
        label_batch: labels per text-encoder call.
        memmap_path: where S_ref (float32) is written as a NumPy memory map when it is larger
            than ``memmap_above_bytes`` (then it lives in the page cache, not the heap).
    """
    pair_segment = np.asarray(pair_segment, np.int64)
    if len(pair_segment) == 0:
        return ReferenceSet(S_ref=np.zeros((0, reader.dim), np.float32),
                            L_ref=np.zeros((0, text_encoder.dim), np.float32), pair_segment=np.zeros(0, np.int64),
                            pair_label=np.zeros(0, np.int64), labels=[], roots=[], segment_image=[],
                            segment_bbox=np.zeros((0, 4), np.int32), segment_area=np.zeros(0, np.int64),
                            segment_source=[])
    labels, roots = _array(labels), _array(roots)
    enc = pc.dictionary_encode(labels)
    label_of = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)   # first-appearance order
    label_text = enc.dictionary.to_pylist()
    n = len(label_text)
    _, first = np.unique(label_of, return_index=True)
    root_list = roots.take(pa.array(first)).to_pylist()
    _, first_pair = np.unique(pair_segment * n + label_of, return_index=True)
    first_pair.sort()
    ps, pl = pair_segment[first_pair], label_of[first_pair]
    used = np.unique(ps)
    meta = reader.metadata(used)
    S = None
    if memmap_path is not None and len(used) * reader.dim * 4 > memmap_above_bytes:
        S = np.lib.format.open_memmap(memmap_path, mode="w+", dtype=np.float32, shape=(len(used), reader.dim))
    S = reader.embeddings(used, out=S)
    L = embed_labels(text_encoder, label_text, templates, batch_size=label_batch)
    return ReferenceSet(S_ref=S, L_ref=L, pair_segment=np.searchsorted(used, ps), pair_label=pl, labels=label_text,
                        roots=root_list, segment_image=meta["image"], segment_bbox=meta["bbox"],
                        segment_area=meta["area"], segment_source=meta["source"])


def knee_stage(root_ids: np.ndarray, pair_segment: np.ndarray, keep: np.ndarray, root_names: Sequence[str], *,
               min_groups: int = 10, min_ratio: float = KNEE_MIN_RATIO, max_rank: int = KNEE_MAX_RANK,
               max_removed_share: float = KNEE_MAX_REMOVED_SHARE) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Step 8 on pair arrays: group sizes = distinct segments per root among the kept pairs,
    the knee cut of `reme.build.filtering.knee_cut`, and the kept pairs of the removed roots.

    Args:
        root_ids: (p,) int root index of each pair into ``root_names``.
        pair_segment: (p,) int64 segment id of each pair.
        keep: (p,) bool pairs still kept after step 7.
        root_names: the root of each index.
        min_groups, min_ratio, max_rank, max_removed_share: see `reme.build.filtering.knee_cut`.

    Returns:
        ``(removed_pairs, removed_roots, info)``: (p,) bool kept pairs whose root is removed,
        the removed roots (largest first), and the manifest entries ``knee_group_sizes``
        (root -> size) and ``knee_filter`` (knee rank, cap, removed share, parameters).
    """
    root_ids = np.asarray(root_ids, np.int64)
    pair_segment = np.asarray(pair_segment, np.int64)
    n = len(root_names)
    segs = np.unique(pair_segment[keep]) if keep.any() else np.zeros(0, np.int64)
    uniq = np.unique(root_ids[keep] * max(len(segs), 1) + np.searchsorted(segs, pair_segment[keep]))
    sizes = np.bincount(uniq // max(len(segs), 1), minlength=n)
    group_sizes = {str(root_names[r]): int(sizes[r]) for r in np.flatnonzero(sizes)}
    cut = knee_cut(group_sizes, min_groups=min_groups, min_ratio=min_ratio, max_rank=max_rank,
                   max_removed_share=max_removed_share)
    removed = cut["removed"]
    removed_set = set(removed)
    removed_ids = np.array([i for i, r in enumerate(root_names) if str(r) in removed_set], np.int64)
    knee = keep & np.isin(root_ids, removed_ids)
    return knee, removed, {"knee_group_sizes": group_sizes,
                           "knee_filter": {k: v for k, v in cut.items() if k != "removed"}}


def synonym_partners(syn: Sequence[tuple[str, str, float]]) -> dict[str, list[str]]:
    """root -> its synonyms (both directions) from `reme.build.synonyms.synonym_pairs` (step 9)."""
    partners: dict[str, list[str]] = {}
    for a, b, _ in syn:
        partners.setdefault(a, []).append(b)
        partners.setdefault(b, []).append(a)
    return partners


@dataclass
class FilteredPairs:
    """Result of `filter_pairs` (steps 7-9 over a pair table).

    Attributes:
        segment: (q,) int64 segment of each output pair (kept pairs in pair order, then the
            synonym pairs of step 9).
        label, root: q label texts and root nouns (Arrow string arrays).
        keep: (p,) bool source pairs kept after steps 7-8 (relabelled pairs count as kept).
        pair_root: (p,) object final root of each source pair (changed by relabelling).
        info: counts ``pairs_after_group_filter``, ``pairs_relabelled``,
            ``pairs_after_knee_filter``, ``pairs_after_synonyms`` and manifest entries
            (``knee_group_sizes``, ``knee_filter``, ``ambiguous_roots_removed``, ``synonym_pairs``).
        dropped: the ``dropped`` table of the source pairs removed (image, bbox, label, root,
            reason, score).
    """

    segment: np.ndarray
    label: pa.Array
    root: pa.Array
    keep: np.ndarray
    pair_root: np.ndarray
    info: dict[str, Any]
    dropped: dict[str, Any]


def filter_pairs(reader: ShardReader, params, embed_roots: Callable[[list[str]], np.ndarray], *,
                 budget_rows: int = 1_000_000, progress: bool = False) -> FilteredPairs:
    """Steps 7-9 of the method (docs/method.md) over the pairs of ``reader``, the one sequence run
    by the build (`caption_global_stages`), the ablation runner
    (`reme.eval.ablation.apply_stages`) and the benchmarks:

    7. the group filter: the group-median filter
       ([`group_median_filter`][reme.build.filtering.group_median_filter]) or a CLIP-score baseline
       ([`clip_score_filter`][reme.build.filtering.clip_score_filter]), per ``params.filter_method``;
       optionally relabelling instead of dropping
       ([`relabel_dropped`][reme.build.filtering.relabel_dropped]);
    8. the ambiguous-label knee filter (`knee_stage`);
    9. synonym enrichment ([`synonym_pairs`][reme.build.synonyms.synonym_pairs] on the kept roots;
       each kept pair also gets its root's synonyms, substituted into its noun phrase).

    Args:
        reader: pairs and embeddings (`ShardReader` over shards, `ArrayReader` in memory).
        params: a [`CaptionBuildParams`][reme.build.pipeline.CaptionBuildParams] (every stage field is read).
        embed_roots: ``roots -> (len(roots), d') float32`` L2-normalised text embeddings of root nouns
            (step 9's similarity).
        budget_rows: embeddings read per pass of steps 7 and relabel.
        progress: progress bars.

    Returns:
        A `FilteredPairs`.
    """
    pairs = reader.pairs()
    ps = pairs.column("segment").to_numpy().astype(np.int64)
    p = len(ps)
    renc = pc.dictionary_encode(_array(pairs.column("root")))
    root_ids = renc.indices.to_numpy(zero_copy_only=False).astype(np.int64) if p else np.zeros(0, np.int64)
    root_names = np.asarray(renc.dictionary.to_pylist(), dtype=object)
    info: dict[str, Any] = {}
    keep = np.ones(p, bool)
    score = np.full(p, np.nan, np.float32)
    method = params.filter_method
    if params.group_filter and p and method == "median":                                 # step 7
        keep, score = group_median_filter(reader, ps, root_ids, drop_rate=params.drop_rate,
                                          adaptive=params.adaptive_filter, max_drop_rate=params.max_drop_rate,
                                          return_scores=True, budget_rows=budget_rows, progress=progress)
    elif params.group_filter and p:                                                      # step 7 baselines
        clip = reader.pair_scores()
        keep = clip_score_filter(clip, root_ids if method == "clip_group" else None, drop_rate=params.drop_rate)
        score = clip.astype(np.float32)
    reason = np.where(keep, "", "group_filter").astype(object)
    info["pairs_after_group_filter"] = int(keep.sum())
    relabelled = 0
    if params.relabel and params.group_filter and (~keep).any():                         # relabel, not drop
        new, _ = relabel_dropped(reader, ps, root_ids, keep, min_similarity=params.relabel_min_similarity,
                                 budget_rows=budget_rows, progress=progress)
        hit = np.flatnonzero(new >= 0)
        kept_roots = np.unique(root_ids[keep])
        labels, roots_l, heads = (pairs.column(c).to_pylist() for c in ("label", "root", "head"))
        for i in hit:                                   # the pair takes the root of the group it joined
            root_ids[i] = kept_roots[new[i]]
            q = substitute_root(NounPhrase(text=labels[i], root=roots_l[i], head=heads[i]), root_names[root_ids[i]])
            labels[i], roots_l[i], heads[i] = q.text, q.root, q.head
        pairs = pairs.set_column(1, "label", pa.array(labels, pa.string()))
        pairs = pairs.set_column(2, "root", pa.array(roots_l, pa.string()))
        pairs = pairs.set_column(3, "head", pa.array(heads, pa.string()))
        keep[hit] = True
        reason[hit] = ""
        relabelled = len(hit)
    info["pairs_relabelled"] = relabelled
    removed: list[str] = []
    if params.knee_filter and p:                                                         # step 8
        knee, removed, kinfo = knee_stage(root_ids, ps, keep, root_names, min_groups=params.knee_min_groups,
                                          min_ratio=params.knee_min_ratio, max_rank=params.knee_max_rank,
                                          max_removed_share=params.knee_max_removed_share)
        info.update(kinfo)
        reason[knee] = "knee_filter"
        keep &= ~knee
    info["pairs_after_knee_filter"] = int(keep.sum())
    gone = np.flatnonzero(~keep)
    useg, inv = np.unique(ps[gone], return_inverse=True)
    gmeta = reader.metadata(useg)
    dropped = {"image": [gmeta["image"][j] for j in inv.ravel()], "bbox": gmeta["bbox"][inv.ravel()].reshape(-1, 4),
               "label": pairs.column("label").take(pa.array(gone)).to_pylist(),
               "root": root_names[root_ids[gone]].tolist(), "reason": reason[gone].tolist(),
               "score": np.where(reason[gone] == "group_filter", score[gone], np.nan).astype(np.float32)}
    info["ambiguous_roots_removed"] = removed
    kidx = pa.array(np.flatnonzero(keep))
    kept_seg = ps[keep]
    kept_label = pairs.column("label").take(kidx)
    kept_root = pairs.column("root").take(kidx)
    syn: list[tuple[str, str, float]] = []
    extra_seg: list[int] = []
    extra_label: list[str] = []
    extra_root: list[str] = []
    if params.k_sim > 0 and len(kept_seg):                                               # step 9
        distinct = sorted(set(pc.unique(kept_root).to_pylist()))
        syn = synonym_pairs(distinct, embed_roots(distinct), params.k_sim,
                            skip_head_pairs=params.synonym_skip_head_pairs)
        partners = synonym_partners(syn)
        hit = np.flatnonzero(pc.is_in(kept_root, value_set=pa.array(sorted(partners), pa.string()))
                             .to_numpy(zero_copy_only=False))
        if len(hit):
            hi = pa.array(hit)
            heads = pairs.column("head").take(kidx).take(hi).to_pylist()
            for s, t, r, h in zip(kept_seg[hit].tolist(), kept_label.take(hi).to_pylist(),
                                  kept_root.take(hi).to_pylist(), heads):
                phrase = NounPhrase(text=t, root=r, head=h)
                for other in partners[r]:
                    q = substitute_root(phrase, other)
                    extra_seg.append(s)
                    extra_label.append(q.text)
                    extra_root.append(q.root)
    # the synonym labels follow all kept pairs, in kept-pair order (as the in-memory build)
    info["synonym_pairs"] = [[a, b, round(v, 4)] for a, b, v in syn]
    all_seg = np.concatenate([kept_seg, np.asarray(extra_seg, np.int64)])
    info["pairs_after_synonyms"] = int(len(all_seg))
    return FilteredPairs(segment=all_seg,
                         label=pa.concat_arrays([_array(kept_label), pa.array(extra_label, pa.string())]),
                         root=pa.concat_arrays([_array(kept_root), pa.array(extra_root, pa.string())]),
                         keep=keep, pair_root=root_names[root_ids] if p else np.zeros(0, object),
                         info=info, dropped=dropped)


def caption_global_stages(reader: ShardReader, params, text_encoder, templates: Sequence[str], *,
                          budget_rows: int = 1_000_000, progress: bool = False,
                          memmap_path: Path | None = None) -> tuple[ReferenceSet, dict[str, Any], dict[str, Any]]:
    """Steps 7-10 over the shards of a caption-mode build: `filter_pairs`, then `assemble`.

    Args:
        reader: shard access.
        params: [`reme.build.pipeline.CaptionBuildParams`][reme.build.pipeline.CaptionBuildParams].
        text_encoder: TextEncoder for root synonyms and L_ref.
        templates: step 5 templates.
        budget_rows: embeddings read per group-filter pass (S_ref is memory-mapped at
            ``memmap_path`` when larger than that).
        progress: progress bars.
        memmap_path: see `assemble`.

    Returns:
        (the [`ReferenceSet`][reme.reference.ReferenceSet], without manifest yet; counts and
        manifest entries; the ``dropped`` table).
    """
    out = filter_pairs(reader, params, lambda roots: embed_labels(text_encoder, roots, templates),
                       budget_rows=budget_rows, progress=progress)
    return assemble(reader, out.segment, out.label, out.root, text_encoder, templates, memmap_path=memmap_path,
                    memmap_above_bytes=budget_rows * reader.dim * 4), out.info, out.dropped


def _array(x) -> pa.Array:
    return x.combine_chunks() if isinstance(x, pa.ChunkedArray) else x


def gt_global_stages(reader: ShardReader, text_encoder, templates: Sequence[str], *,
                     memmap_path: Path | None = None, memmap_above_bytes: float = 1 << 30) -> ReferenceSet:
    """Assembly of a GT-mode build (labels are the GT names, roots equal labels)."""
    pairs = reader.pairs()
    return assemble(reader, pairs.column("segment").to_numpy().astype(np.int64), pairs.column("label"),
                    pairs.column("label"), text_encoder, templates, memmap_path=memmap_path,
                    memmap_above_bytes=memmap_above_bytes)
