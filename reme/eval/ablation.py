"""Ablations of the reference-set build stages (docs/method.md Part 1, steps 7-9).

Two runners, each giving one table:

* `ablate_caption`: builds caption-mode reference sets from the same photos and
  captions with stages switched off/on (`CAPTION_VARIANTS`: no filtering, fixed
  delta, adaptive delta, knee filter, synonym enrichment) and evaluates each on the same
  data. Dense features of the photos are computed once and reused by every variant.
* `ablate_noisy_gt`: a controlled, offline-meaningful version. Start from a GT-mode
  reference (one correct label per segment), replace the labels of a known fraction of pairs
  by a different label drawn uniformly at random, then apply the build's own stage functions
  (`reme.build.filter_pairs`: group filter, relabel, knee filter, synonyms) with
  the label as root noun. Besides mIoU it reports
  the label precision of the kept pairs and the share of correct pairs kept, which measure
  the filter directly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from reme.eval.datasets import SegDataset
from reme.eval.protocol import MemoVisualEncoder, Protocol
from reme.eval.report import markdown_table, write_json, write_text
from reme.eval.runner import evaluate
from reme.build.filtering import KNEE_MAX_RANK, KNEE_MAX_REMOVED_SHARE, KNEE_MIN_RATIO
from reme.build import ArrayReader, filter_pairs
from reme.reference import ReferenceSet

logger = logging.getLogger(__name__)

#: Caption-mode variants: name -> `reme.build.pipeline.CaptionBuildParams` fields.
CAPTION_VARIANTS: dict[str, dict] = {
    "no filtering, no synonyms": dict(group_filter=False, knee_filter=False, k_sim=0),
    "fixed delta 30%": dict(group_filter=True, adaptive_filter=False, drop_rate=0.30, knee_filter=False, k_sim=0),
    "adaptive delta (0-50%)": dict(group_filter=True, adaptive_filter=True, knee_filter=False, k_sim=0),
    "fixed delta + knee": dict(group_filter=True, adaptive_filter=False, drop_rate=0.30, knee_filter=True, k_sim=0),
    "fixed delta + knee + synonyms (paper)": dict(group_filter=True, adaptive_filter=False, drop_rate=0.30,
                                                  knee_filter=True, k_sim=30),
    "adaptive delta + knee + synonyms": dict(group_filter=True, adaptive_filter=True, knee_filter=True, k_sim=30),
    # issue 7: the paper's CLIP-score baselines and relabel-instead-of-drop
    "CLIP score, global 30%": dict(group_filter=True, filter_method="clip_global", knee_filter=False, k_sim=0),
    "CLIP score, per group 30%": dict(group_filter=True, filter_method="clip_group", knee_filter=False, k_sim=0),
    "fixed delta 30% + relabel": dict(group_filter=True, drop_rate=0.30, relabel=True, knee_filter=False, k_sim=0),
}

#: Stage switches of the noisy-GT ablation: name -> keyword arguments of `apply_stages`.
NOISY_GT_VARIANTS: dict[str, dict] = {
    "no filtering": dict(group_filter=False),
    "fixed delta 30%": dict(group_filter=True, drop_rate=0.30),
    "fixed delta 50%": dict(group_filter=True, drop_rate=0.50),
    "adaptive delta (0-50%)": dict(group_filter=True, adaptive=True),
    "fixed delta 30% + knee": dict(group_filter=True, drop_rate=0.30, knee_filter=True),
    "fixed delta 30% + synonyms (k_sim=3)": dict(group_filter=True, drop_rate=0.30, k_sim=3),
    "fixed delta 30% + relabel (issue 7)": dict(group_filter=True, drop_rate=0.30, relabel=True),
}


def reference_from_pairs(ref: ReferenceSet, pair_segment: np.ndarray, pair_label: np.ndarray,
                         note: dict | None = None) -> ReferenceSet:
    """A reference set with the same S_ref rows / L_ref but new O_ref pairs; segments left
    without any pair are dropped (as the build does).

    Args:
        ref: the source set.
        pair_segment, pair_label: (p,) int64 new nonzeros of O_ref (duplicates removed).
        note: added to the manifest under ``"ablation"``.
    """
    ps = np.asarray(pair_segment, np.int64)
    pl = np.asarray(pair_label, np.int64)
    if len(ps):
        uniq = np.unique(ps * max(ref.num_labels, 1) + pl)
        ps, pl = uniq // max(ref.num_labels, 1), uniq % max(ref.num_labels, 1)
    used = np.unique(ps)
    remap = np.full(ref.num_segments, -1, np.int64)
    remap[used] = np.arange(len(used))
    manifest = dict(ref.manifest)
    manifest["ablation"] = note or {}
    manifest["num_segments"], manifest["num_pairs"] = int(len(used)), int(len(ps))
    return ReferenceSet(
        S_ref=np.asarray(ref.S_ref)[used], L_ref=ref.L_ref, pair_segment=remap[ps], pair_label=pl,
        labels=list(ref.labels), roots=list(ref.roots), segment_image=[ref.segment_image[i] for i in used],
        segment_bbox=np.asarray(ref.segment_bbox)[used], segment_area=np.asarray(ref.segment_area)[used],
        manifest=manifest, segment_source=[ref.segment_source[i] for i in used],
    )


def corrupt_labels(ref: ReferenceSet, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy pair labels: ``round(fraction * p)`` pairs, chosen uniformly without
    replacement, get a different label drawn uniformly from the other labels.

    Returns:
        ``(pair_label, corrupted)``: (p,) int64 new labels and (p,) bool mask of the changed
        pairs.

    Raises:
        ValueError: fraction outside [0, 1] or fewer than 2 labels.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    n = ref.num_labels
    if n < 2:
        raise ValueError("label corruption needs at least 2 labels")
    rng = np.random.default_rng(seed)
    p = len(ref.pair_label)
    idx = rng.choice(p, size=int(round(fraction * p)), replace=False)
    labels = ref.pair_label.copy()
    shift = rng.integers(1, n, size=len(idx))                 # never the original label
    labels[idx] = (labels[idx] + shift) % n
    corrupted = np.zeros(p, bool)
    corrupted[idx] = True
    return labels, corrupted


def apply_stages(ref: ReferenceSet, pair_label: np.ndarray | None = None, *, group_filter: bool = False,
                 drop_rate: float = 0.30, adaptive: bool = False, max_drop_rate: float = 0.50,
                 knee_filter: bool = False, knee_min_groups: int = 10, knee_min_ratio: float = KNEE_MIN_RATIO,
                 knee_max_rank: int = KNEE_MAX_RANK, knee_max_removed_share: float = KNEE_MAX_REMOVED_SHARE,
                 k_sim: int = 0, relabel: bool = False,
                 relabel_min_similarity: float = 0.5) -> tuple[ReferenceSet, np.ndarray, dict]:
    """Steps 7-9 of the method applied to a reference set's pairs, the label text as root noun,
    by the build's own stage sequence (`reme.build.filter_pairs` over an
    `reme.build._global_stages.ArrayReader` of S_ref; step 9's similarity on L_ref rows).

    Args:
        ref: source set (its S_ref is the visual embedding of step 7).
        pair_label: (p,) labels to use instead of ``ref.pair_label`` (e.g. corrupted ones).
        group_filter, drop_rate, adaptive, max_drop_rate: step 7.
        knee_filter, knee_min_groups, knee_min_ratio, knee_max_rank, knee_max_removed_share: step 8
            (`reme.build.filtering.knee_cut`).
        relabel, relabel_min_similarity: give pairs dropped by step 7 the label of the nearest
            kept group centre instead (`reme.build.filtering.relabel_dropped`).
        k_sim: step 9: the k_sim most similar label pairs (L_ref cosine) become synonyms and
            each kept pair also gets its label's synonyms; 0 = off.

    Returns:
        ``(reference, keep, info)``: the new set, (p,) bool mask of the source pairs kept,
        and counts / removed roots / synonym pairs.
    """
    from reme.build.pipeline import CaptionBuildParams

    labels = ref.pair_label if pair_label is None else np.asarray(pair_label, np.int64)
    ps = np.asarray(ref.pair_segment, np.int64)
    names = list(ref.labels)
    index = {name: i for i, name in enumerate(names)}
    L = np.asarray(ref.L_ref, np.float32)
    text = [names[i] for i in labels]
    params = CaptionBuildParams(group_filter=group_filter, drop_rate=drop_rate, adaptive_filter=adaptive,
                                max_drop_rate=max_drop_rate, knee_filter=knee_filter, knee_min_groups=knee_min_groups,
                                knee_min_ratio=knee_min_ratio, knee_max_rank=knee_max_rank,
                                knee_max_removed_share=knee_max_removed_share, k_sim=k_sim, relabel=relabel,
                                relabel_min_similarity=relabel_min_similarity)
    out = filter_pairs(ArrayReader(np.asarray(ref.S_ref, np.float32), ps, text, text), params,
                       lambda roots: L[[index[r] for r in roots]], budget_rows=max(len(ps), 1))
    info: dict = {"pairs_in": int(len(ps)), "pairs_after_group_filter": out.info["pairs_after_group_filter"]}
    if relabel and group_filter and out.info["pairs_after_group_filter"] < len(ps):
        info["pairs_relabelled"] = out.info["pairs_relabelled"]
        # final label per source pair (popped by ablate_noisy_gt)
        info["pair_labels"] = np.array([index[r] for r in out.pair_root.tolist()], np.int64)
    if "knee_filter" in out.info:
        info["knee_filter"] = out.info["knee_filter"]
    info["ambiguous_roots_removed"] = out.info["ambiguous_roots_removed"]
    info["pairs_after_knee_filter"] = out.info["pairs_after_knee_filter"]
    info["synonym_pairs"] = out.info["synonym_pairs"]
    info["pairs_out"] = int(len(out.segment))
    new_pl = np.array([index[t] for t in out.label.to_pylist()], np.int64)
    note = {k: v for k, v in info.items() if k != "pair_labels"}
    return reference_from_pairs(ref, out.segment, new_pl, note=note), out.keep, info


def _eval_row(ref_or_seg, dataset, protocol, segmenter_kwargs, encoders, progress):
    from reme.inference.segmenter import Segmenter

    seg = Segmenter(ref_or_seg, visual_encoder=encoders[0], text_encoder=encoders[1], **segmenter_kwargs)
    res = evaluate(seg, dataset, protocol, progress=progress, num_vis=0)
    return res


def ablate_noisy_gt(ref: ReferenceSet, dataset: SegDataset, protocol: Protocol | None = None, *,
                    noise: float = 0.30, seed: int = 0, variants: dict[str, dict] | None = None,
                    include_clean: bool = True, segmenter_kwargs: dict | None = None, device=None,
                    out_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Noisy-GT ablation (module docstring).

    Args:
        ref: a GT-mode reference set (one correct label per segment).
        dataset: evaluation data.
        protocol: evaluation protocol (default: the dataset's).
        noise: fraction of pairs whose label is replaced.
        seed: corruption seed.
        variants: name -> `apply_stages` keywords (default `NOISY_GT_VARIANTS`).
        include_clean: also evaluate the uncorrupted reference.
        segmenter_kwargs: ``top_k``, logit scales, ... for every Segmenter.
        out_dir: writes ``ablation.json`` and ``ablation.md``.

    Returns:
        One row per variant: ``variant``, ``pairs``, ``label_precision`` (% of kept source
        pairs whose label is the true one), ``correct_kept`` (% of correct pairs kept),
        ``noisy_removed`` (% of corrupted pairs removed), ``miou``, ``pixel_acc``, ``mean_acc``.
    """
    from reme.encoders import resolve_encoder

    variants = NOISY_GT_VARIANTS if variants is None else variants
    kw = dict(segmenter_kwargs or {})
    man = ref.manifest.get("encoders", {})
    vis = MemoVisualEncoder(resolve_encoder(man["visual"], device=device), size=max(len(dataset), 1))
    txt = resolve_encoder(man["text"], device=device)
    noisy_labels, corrupted = corrupt_labels(ref, noise, seed)
    correct = ~corrupted
    rows = []
    todo: list[tuple[str, ReferenceSet, np.ndarray | None, dict]] = []
    if include_clean:
        todo.append(("clean reference (no noise)", ref, None, {}))
    for name, opts in variants.items():
        new, keep, info = apply_stages(ref, noisy_labels, **opts)
        todo.append((f"noise {noise:.0%}: {name}", new, keep, info))
    for name, r, keep, info in todo:
        t0 = time.perf_counter()
        res = _eval_row(r, dataset, protocol, kw, (vis, txt), progress)
        row = {"variant": name, "pairs": int(len(r.pair_segment)), "segments": r.num_segments,
               "miou": res.miou, "pixel_acc": res.pixel_acc, "mean_acc": res.scores["mean_acc"],
               "seconds": round(time.perf_counter() - t0, 1), "info": info}
        if keep is not None:
            final = info.pop("pair_labels", None)
            ok = correct if final is None else (final == ref.pair_label)   # relabelled pairs judged by new label
            row["label_precision"] = 100.0 * float(ok[keep].mean()) if keep.any() else float("nan")
            row["correct_kept"] = 100.0 * float((keep & ok).sum() / max(correct.sum(), 1))
            row["noisy_removed"] = 100.0 * float((~keep & corrupted).sum() / max(corrupted.sum(), 1))
        else:
            row["label_precision"], row["correct_kept"], row["noisy_removed"] = 100.0, 100.0, float("nan")
        logger.info("%s: mIoU %.2f", name, res.miou)
        rows.append(row)
    if out_dir is not None:
        _write_table(rows, out_dir, {"kind": "noisy-gt", "noise": noise, "seed": seed, "dataset": dataset.name,
                                     "num_images": len(dataset), "protocol": (protocol.to_dict() if protocol else None)},
                     ["variant", "pairs", "label_precision", "correct_kept", "noisy_removed", "miou", "pixel_acc"],
                     ["variant", "pairs", "label precision %", "correct pairs kept %", "noisy pairs removed %",
                      "mIoU", "pixel acc."])
    return rows


def ablate_caption(image_root: str | Path, captioner, pairing_model, visual_encoder, text_encoder,
                   dataset: SegDataset, protocol: Protocol | None = None, *, variants: dict[str, dict] | None = None,
                   felzenszwalb=None, images: Sequence[str] | None = None, segmenter_kwargs: dict | None = None,
                   device=None, out_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Caption-mode ablation: one reference per variant, each evaluated on ``dataset``.

    Args:
        image_root: reference photos.
        captioner, pairing_model, visual_encoder, text_encoder: encoder objects or specs
            (``reme.encoders.resolve_encoder``); captions e.g. ``captions:/path/file.jsonl``.
        dataset: evaluation data.
        protocol: evaluation protocol (default: the dataset's).
        variants: name -> [`reme.build.pipeline.CaptionBuildParams`][reme.build.pipeline.CaptionBuildParams] fields
            (default `CAPTION_VARIANTS`).
        felzenszwalb: proposal settings of the build (default FreeDA's).
        images: image keys under ``image_root`` (default: all).
        segmenter_kwargs: retrieval settings for every Segmenter.
        out_dir: writes ``ablation.json`` and ``ablation.md``.

    Returns:
        One row per variant: ``variant``, the stage counts of the build
        (``pairs``, ``pairs_after_group_filter``, ``pairs_after_knee_filter``,
        ``pairs_after_synonyms``), ``segments``, ``labels``, ``miou``, ``pixel_acc``.
    """
    from reme.build.pipeline import CaptionBuildParams, build_caption_reference
    from reme.encoders import resolve_encoder
    from reme.proposals import FelzenszwalbParams

    def enc(x):
        return resolve_encoder(x, device=device) if isinstance(x, str) else x

    variants = CAPTION_VARIANTS if variants is None else variants
    cap, clip, vis, txt = enc(captioner), enc(pairing_model), enc(visual_encoder), enc(text_encoder)
    n_img = len(images) if images is not None else 100000
    cache = n_img if n_img <= 2000 else 0                     # dense features of every photo, when small
    clip_m, vis_m = MemoVisualEncoder(clip, cache), MemoVisualEncoder(vis, cache)
    txt_m = clip_m if txt is clip else txt
    vis_eval = MemoVisualEncoder(vis, max(len(dataset), 1))
    fz = felzenszwalb or FelzenszwalbParams()
    rows = []
    for name, opts in variants.items():
        t0 = time.perf_counter()
        params = replace(CaptionBuildParams(), **opts)
        ref = build_caption_reference(image_root, cap, clip_m, vis_m, txt_m, params=params, felzenszwalb=fz,
                                      images=images, progress=progress)
        t_build = time.perf_counter() - t0
        res = _eval_row(ref, dataset, protocol, dict(segmenter_kwargs or {}), (vis_eval, txt), progress)
        c = ref.manifest.get("counts", {})
        row = {"variant": name, "params": asdict(params), "pairs": c.get("pairs"),
               "pairs_after_group_filter": c.get("pairs_after_group_filter"),
               "pairs_after_knee_filter": c.get("pairs_after_knee_filter"),
               "pairs_after_synonyms": c.get("pairs_after_synonyms"), "segments": ref.num_segments,
               "labels": ref.num_labels, "ambiguous_roots_removed": ref.manifest.get("ambiguous_roots_removed", []),
               "miou": res.miou, "pixel_acc": res.pixel_acc, "mean_acc": res.scores["mean_acc"],
               "seconds_build": round(t_build, 1), "seconds_eval": round(res.seconds, 1)}
        logger.info("%s: %s pairs, mIoU %.2f", name, row["pairs_after_synonyms"], res.miou)
        rows.append(row)
    if out_dir is not None:
        _write_table(rows, out_dir, {"kind": "caption", "dataset": dataset.name, "num_images": len(dataset),
                                     "encoders": {"captioner": cap.spec, "pairing": clip.spec, "visual": vis.spec,
                                                  "text": txt.spec},
                                     "protocol": (protocol.to_dict() if protocol else None)},
                     ["variant", "pairs_after_group_filter", "pairs_after_knee_filter", "pairs_after_synonyms",
                      "labels", "miou", "pixel_acc"],
                     ["variant", "pairs after step 7", "after step 8", "after step 9", "labels", "mIoU", "pixel acc."])
    return rows


def _write_table(rows, out_dir, meta, columns, headers) -> None:
    out_dir = Path(out_dir)
    write_json({**meta, "rows": rows}, out_dir / "ablation.json")
    write_text(markdown_table(rows, columns, headers), out_dir / "ablation.md")


def ablation_table(rows: Sequence[dict], kind: str) -> str:
    """The Markdown table printed by ``reme ablate`` for ``kind`` ``"noisy-gt"`` or ``"caption"``."""
    if kind == "noisy-gt":
        return markdown_table(rows, ["variant", "pairs", "label_precision", "correct_kept", "noisy_removed", "miou",
                                     "pixel_acc"],
                              ["variant", "pairs", "label precision %", "correct pairs kept %",
                               "noisy pairs removed %", "mIoU", "pixel acc."])
    return markdown_table(rows, ["variant", "pairs_after_group_filter", "pairs_after_knee_filter",
                                 "pairs_after_synonyms", "labels", "miou", "pixel_acc"],
                          ["variant", "pairs after step 7", "after step 8", "after step 9", "labels", "mIoU",
                           "pixel acc."])


__all__ = ["CAPTION_VARIANTS", "NOISY_GT_VARIANTS", "ablate_caption", "ablate_noisy_gt", "ablation_table",
           "apply_stages", "corrupt_labels", "reference_from_pairs"]
