"""Building a reference set from photos (METHOD.md Part 1).

Two modes:

* **caption mode** (:func:`build_caption_reference`, the paper's method): Felzenszwalb
  segments, captions, spaCy noun phrases, CLIP pairing, group-median filter, ambiguous-label
  knee filter, synonym enrichment (steps 1-10).
* **GT mode** (:func:`build_gt_reference`, the paper's Fig. 1b "GT reference"): segments and
  labels from ground-truth annotations instead of captions and pairing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from reme._version import __version__
from reme.errors import ImageReadError
from reme.filtering import ambiguous_roots, group_median_filter
from reme.io import list_images, load_image
from reme.nounphrases import NounPhrase, extract_noun_phrases, load_spacy, substitute_root
from reme.pairing import pair_labels_to_segments
from reme.pooling import mask_average_pool, masks_average_pool
from reme.proposals import FelzenszwalbParams, felzenszwalb_segments, segment_bboxes
from reme.reference import ReferenceSet
from reme.synonyms import synonym_pairs
from reme.text_embedding import TEMPLATES, embed_labels

logger = logging.getLogger(__name__)


@dataclass
class CaptionBuildParams:
    """Hyper-parameters of caption mode; defaults are the paper's (METHOD.md Part 1).

    Attributes:
        drop_rate: delta_filter of step 7 (30 %).
        adaptive_filter: adaptive per-group drop rate in [0, max_drop_rate] (step 7 variant).
        max_drop_rate: upper end of the adaptive range (50 %).
        group_filter: run step 7 at all.
        knee_filter: run step 8.
        knee_min_groups: below this many root groups step 8 removes nothing (our choice).
        k_sim: number of synonym pairs of step 9 (30); 0 disables enrichment.
        keep_compounds: compound modifiers stay in the root noun (our choice, step 3).
    """

    drop_rate: float = 0.30
    adaptive_filter: bool = False
    max_drop_rate: float = 0.50
    group_filter: bool = True
    knee_filter: bool = True
    knee_min_groups: int = 10
    k_sim: int = 30
    keep_compounds: bool = True


class _Collector:
    """Accumulates reference segments (rows of S_ref) and their provenance."""

    def __init__(self):
        self.S: list[np.ndarray] = []
        self.image: list[str] = []
        self.bbox: list[np.ndarray] = []
        self.area: list[np.ndarray] = []
        self.source: list[str] = []

    def add(self, S: np.ndarray, key: str, bbox: np.ndarray, area: np.ndarray, source: str) -> np.ndarray:
        start = len(self.image)
        self.S.append(np.asarray(S, np.float32))
        self.image.extend([key] * len(S))
        self.source.extend([source] * len(S))
        self.bbox.append(np.asarray(bbox, np.int32).reshape(-1, 4))
        self.area.append(np.asarray(area, np.int64))
        return np.arange(start, start + len(S))

    def arrays(self, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.S:
            return np.zeros((0, d), np.float32), np.zeros((0, 4), np.int32), np.zeros(0, np.int64)
        return np.concatenate(self.S), np.concatenate(self.bbox), np.concatenate(self.area)


def _finish(collector: _Collector, visual_dim: int, pair_seg: np.ndarray, pair_text: list[str],
            pair_root: list[str], text_encoder, templates, manifest: dict, dropped: dict | None = None) -> ReferenceSet:
    """Drop segments without labels, deduplicate labels, embed L_ref, assemble the set."""
    S, bbox, area = collector.arrays(visual_dim)
    # distinct (segment, label) pairs; label ids in order of first appearance
    label_id: dict[str, int] = {}
    roots: list[str] = []
    seen = set()
    ps, pl = [], []
    for s, t, r in zip(pair_seg.tolist(), pair_text, pair_root):
        if t not in label_id:
            label_id[t] = len(label_id)
            roots.append(r)
        key = (s, label_id[t])
        if key not in seen:
            seen.add(key)
            ps.append(s)
            pl.append(label_id[t])
    used = np.unique(np.asarray(ps, np.int64))
    remap = np.full(len(S), -1, np.int64)
    remap[used] = np.arange(len(used))
    labels = list(label_id)
    L = embed_labels(text_encoder, labels, templates) if labels else np.zeros((0, text_encoder.dim), np.float32)
    manifest.setdefault("counts", {})["final_segments"] = int(len(used))
    manifest["counts"]["final_labels"] = len(labels)
    manifest["counts"]["final_pairs"] = len(ps)
    return ReferenceSet(
        S_ref=S[used], L_ref=L, pair_segment=remap[np.asarray(ps, np.int64)] if ps else np.zeros(0, np.int64),
        pair_label=np.asarray(pl, np.int64), labels=labels, roots=roots,
        segment_image=[collector.image[i] for i in used], segment_bbox=bbox[used], segment_area=area[used],
        manifest=manifest, segment_source=[collector.source[i] for i in used], dropped=dropped,
    )


def _base_manifest(mode: str, visual_encoder, text_encoder, fz: FelzenszwalbParams, templates, image_root) -> dict:
    return {
        "mode": mode,
        "encoders": {"visual": visual_encoder.spec, "text": text_encoder.spec},
        "templates": list(templates),
        "felzenszwalb": asdict(fz),
        "image_root": str(image_root),
        "reme_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _read(path: Path, key: str, skipped: list[dict]) -> np.ndarray | None:
    try:
        return load_image(path)
    except ImageReadError as exc:
        logger.warning("skipping %s: %s", key, exc)
        skipped.append({"image": key, "reason": str(exc)})
        return None


@torch.inference_mode()
def build_gt_reference(image_root: str | Path, annotations, visual_encoder, text_encoder, *,
                       segments: str = "proposals", felzenszwalb: FelzenszwalbParams = FelzenszwalbParams(),
                       min_purity: float = 0.5, background_label: str | None = None,
                       exclude_labels: Sequence[str] = (), templates: Sequence[str] = TEMPLATES,
                       images: Sequence[str] | None = None, progress: bool = True) -> ReferenceSet:
    """GT reference: segments labelled by ground-truth annotations (paper Fig. 1b).

    Args:
        image_root: folder of the photos; keys are paths relative to it.
        annotations: :class:`reme.annotations.CocoInstances` or :class:`reme.annotations.MaskFolder`.
        visual_encoder: VisualEncoder for S_ref; text_encoder: TextEncoder for L_ref.
        segments: ``"proposals"`` (default, our choice): Felzenszwalb segments, each labelled
            with the GT label covering at least ``min_purity`` of it -- the same kind of segments
            the test image gets; ``"masks"``: one segment per GT region (a COCO instance, or a
            class region of an index mask).
        felzenszwalb: proposal settings (``segments="proposals"``), recorded in the manifest.
        min_purity: minimum fraction of a proposal covered by its majority GT label.
        background_label: name given to unannotated pixels (None: such segments are dropped).
        exclude_labels: label names to leave out (e.g. "background" of a mask folder).
        templates: prompt templates for L_ref.
        images: image keys to use (default: every annotated image present on disk).
        progress: show a progress bar.

    Returns:
        The :class:`ReferenceSet` (not yet saved).
    """
    if segments not in ("proposals", "masks"):
        raise ValueError(f"segments must be 'proposals' or 'masks', got {segments!r}")
    image_root = Path(image_root)
    names = list(annotations.label_names)
    if background_label:
        names = names + [background_label]
    bg_index = len(names) - 1 if background_label else None
    excluded = set(exclude_labels)
    if images is None:
        if hasattr(annotations, "keys"):
            images = [k for k in annotations.keys() if (image_root / k).is_file()]
        else:
            images = [p.relative_to(image_root).as_posix() for p in list_images(image_root)]
    manifest = _base_manifest("gt", visual_encoder, text_encoder, felzenszwalb, templates, image_root)
    manifest.update({"gt_segments": segments, "min_purity": min_purity, "background_label": background_label,
                     "exclude_labels": sorted(excluded)})
    col, skipped = _Collector(), []
    pair_seg, pair_text = [], []
    for key in tqdm(images, desc="GT reference", unit="img", disable=not progress):
        img = _read(image_root / key, key, skipped)
        if img is None:
            continue
        try:
            gt = annotations.label_map(key, img.shape[:2])
        except (FileNotFoundError, ValueError) as exc:
            logger.warning("skipping %s: %s", key, exc)
            skipped.append({"image": key, "reason": str(exc)})
            continue
        if bg_index is not None:
            gt = np.where(gt == -1, bg_index, gt) if segments == "proposals" else gt
        feats = visual_encoder.dense_features(img)
        if segments == "proposals":
            seg = felzenszwalb_segments(img, felzenszwalb)
            k, nl = int(seg.max()) + 1, len(names)
            valid = gt >= 0
            counts = np.bincount(seg[valid] * nl + gt[valid], minlength=k * nl).reshape(k, nl)
            area = np.bincount(seg.ravel(), minlength=k)
            lab = counts.argmax(1)
            keep = (counts.max(1) >= min_purity * area) & (counts.max(1) > 0)
            keep &= ~np.isin(lab, [i for i, n in enumerate(names) if n in excluded])
            if not keep.any():
                continue
            S = mask_average_pool(feats, seg).cpu().numpy()[keep]
            rows = col.add(S, key, segment_bboxes(seg)[keep], area[keep], "gt_proposal")
            pair_seg.extend(rows.tolist())
            pair_text.extend(names[i] for i in lab[keep])
        else:
            regions = [(gt == li, li) for li in np.unique(gt[gt >= 0]) if names[li] not in excluded]
            if hasattr(annotations, "instance_masks"):
                regions = [(m, li) for m, li, crowd in annotations.instance_masks(key, img.shape[:2])
                           if not crowd and m.any() and names[li] not in excluded]
            if not regions:
                continue
            masks = np.stack([m for m, _ in regions])
            S = masks_average_pool(feats, masks).cpu().numpy()
            boxes = np.array([_mask_bbox(m) for m in masks])
            rows = col.add(S, key, boxes, masks.reshape(len(masks), -1).sum(1), "gt_mask")
            pair_seg.extend(rows.tolist())
            pair_text.extend(names[li] for _, li in regions)
    manifest["counts"] = {"images": len(images), "images_skipped": len(skipped), "gt_segments": len(pair_seg)}
    manifest["skipped_images"] = skipped
    return _finish(col, visual_encoder.dim, np.asarray(pair_seg, np.int64), pair_text, list(pair_text),
                   text_encoder, templates, manifest)


def _mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


@torch.inference_mode()
def build_caption_reference(image_root: str | Path, captioner, pairing_model, visual_encoder, text_encoder, *,
                            params: CaptionBuildParams = CaptionBuildParams(),
                            felzenszwalb: FelzenszwalbParams = FelzenszwalbParams(),
                            templates: Sequence[str] = TEMPLATES, nlp=None,
                            images: Sequence[str] | None = None, progress: bool = True) -> ReferenceSet:
    """Caption-mode reference set, METHOD.md Part 1 steps 1-10.

    Args:
        image_root: folder of unlabeled photos; keys are paths relative to it.
        captioner: a :class:`reme.encoders.Captioner` (LLaVA-1.5, BLIP, or a caption file).
        pairing_model: a :class:`reme.encoders.CLIPModel` for step 4 (image-text aligned).
        visual_encoder: VisualEncoder for S_ref and the group filter (DINOv2 in the paper).
        text_encoder: TextEncoder for L_ref and root-noun synonyms.
        params: filter / enrichment hyper-parameters (:class:`CaptionBuildParams`).
        felzenszwalb: proposal settings (step 1).
        templates: prompt templates (step 5).
        nlp: a spaCy pipeline (default :func:`reme.nounphrases.load_spacy`).
        images: image keys (default: every image under ``image_root``).
        progress: show progress bars.

    Returns:
        The :class:`ReferenceSet`; ``manifest["counts"]`` holds the counts after each stage.
    """
    image_root = Path(image_root)
    nlp = nlp or load_spacy()
    if images is None:
        images = [p.relative_to(image_root).as_posix() for p in list_images(image_root)]
    manifest = _base_manifest("caption", visual_encoder, text_encoder, felzenszwalb, templates, image_root)
    manifest["encoders"].update({"pairing": pairing_model.spec, "captioner": captioner.spec})
    manifest["params"] = asdict(params)
    col, skipped = _Collector(), []
    pair_seg: list[int] = []
    pair_phrase: list[NounPhrase] = []
    clip_label_cache: dict[str, np.ndarray] = {}
    n_captions = n_phrases = n_segments = 0
    for key in tqdm(images, desc="caption reference", unit="img", disable=not progress):
        img = _read(image_root / key, key, skipped)
        if img is None:
            continue
        captions = [c for c in captioner.caption(img, key=key) if c and c.strip()]
        n_captions += len(captions)
        phrases = list({p.text: p for ps in extract_noun_phrases(captions, nlp, keep_compounds=params.keep_compounds)
                        for p in ps}.values())
        if not phrases:
            continue
        n_phrases += len(phrases)
        seg = felzenszwalb_segments(img, felzenszwalb)                                   # step 1
        n_segments += int(seg.max()) + 1
        S_clip = mask_average_pool(pairing_model.dense_features(img), seg).cpu().numpy()  # step 4
        new = [p.text for p in phrases if p.text not in clip_label_cache]
        if new:
            clip_label_cache.update(zip(new, embed_labels(pairing_model, new, templates)))
        L_clip = np.stack([clip_label_cache[p.text] for p in phrases])
        best, _ = pair_labels_to_segments(S_clip, L_clip)
        picked = np.unique(best)
        S_vis = mask_average_pool(visual_encoder.dense_features(img), seg).cpu().numpy()[picked]  # step 6
        area = np.bincount(seg.ravel(), minlength=int(seg.max()) + 1)
        rows = col.add(S_vis, key, segment_bboxes(seg)[picked], area[picked], "caption_pairing")
        row_of = dict(zip(picked.tolist(), rows.tolist()))
        pair_seg.extend(row_of[b] for b in best.tolist())
        pair_phrase.extend(phrases)
    counts = {"images": len(images), "images_skipped": len(skipped), "captions": n_captions,
              "noun_phrases": n_phrases, "proposals": n_segments, "paired_segments": len(col.image),
              "pairs": len(pair_seg)}
    S_all, bbox_all, _ = col.arrays(visual_encoder.dim)
    ps = np.asarray(pair_seg, np.int64)
    roots = [p.root for p in pair_phrase]
    keep = np.ones(len(ps), bool)
    score = np.full(len(ps), np.nan, np.float32)
    if params.group_filter and len(ps):                                                  # step 7
        keep, score = group_median_filter(S_all, ps, roots, drop_rate=params.drop_rate,
                                          adaptive=params.adaptive_filter, max_drop_rate=params.max_drop_rate,
                                          return_scores=True)
    reason = np.where(keep, "", "group_filter").astype(object)
    counts["pairs_after_group_filter"] = int(keep.sum())
    removed_roots: list[str] = []
    if params.knee_filter:                                                               # step 8
        sizes: dict[str, set] = {}
        for s, r in zip(ps[keep].tolist(), np.asarray(roots, object)[keep].tolist()):
            sizes.setdefault(r, set()).add(s)
        removed_roots = ambiguous_roots({r: len(v) for r, v in sizes.items()}, min_groups=params.knee_min_groups)
        knee = keep & np.isin(np.asarray(roots, object), removed_roots)
        reason[knee] = "knee_filter"
        keep &= ~knee
    counts["pairs_after_knee_filter"] = int(keep.sum())
    gone = np.flatnonzero(~keep)
    dropped = {"image": [col.image[ps[i]] for i in gone], "bbox": bbox_all[ps[gone]].reshape(-1, 4),
               "label": [pair_phrase[i].text for i in gone], "root": [roots[i] for i in gone],
               "reason": [reason[i] for i in gone],
               "score": np.where(reason[gone] == "group_filter", score[gone], np.nan).astype(np.float32)}
    manifest["ambiguous_roots_removed"] = removed_roots
    kept_seg = ps[keep].tolist()
    kept_phr = [p for p, k in zip(pair_phrase, keep) if k]
    syn: list[tuple[str, str, float]] = []
    if params.k_sim > 0 and kept_phr:                                                    # step 9
        distinct = sorted({p.root for p in kept_phr})
        syn = synonym_pairs(distinct, embed_labels(text_encoder, distinct, templates), params.k_sim)
        partners: dict[str, list[str]] = {}
        for a, b, _ in syn:
            partners.setdefault(a, []).append(b)
            partners.setdefault(b, []).append(a)
        extra_seg, extra_phr = [], []
        for s, p in zip(kept_seg, kept_phr):
            for other in partners.get(p.root, ()):
                extra_seg.append(s)
                extra_phr.append(substitute_root(p, other))
        kept_seg += extra_seg
        kept_phr += extra_phr
    manifest["synonym_pairs"] = [[a, b, round(v, 4)] for a, b, v in syn]
    counts["pairs_after_synonyms"] = len(kept_seg)
    manifest["counts"] = counts
    manifest["skipped_images"] = skipped
    return _finish(col, visual_encoder.dim, np.asarray(kept_seg, np.int64), [p.text for p in kept_phr],
                   [p.root for p in kept_phr], text_encoder, templates, manifest, dropped)
