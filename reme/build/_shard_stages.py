"""Per-image stages of a reference build, computed one shard (list of images) at a time.

GT mode: read image, GT label map, Felzenszwalb proposals (or GT regions), visual dense
features, mask average pooling (docs/method.md steps 1 and 6, paper Fig. 1b).
Caption mode: read image, captions, spaCy noun phrases, Felzenszwalb proposals, CLIP pairing,
visual embeddings of the picked segments (docs/method.md steps 1-6).

A shard's result depends only on its images and the settings, never on which process or
machine computes it or what ran before: images are processed in fixed batches of
``batch_size`` within the shard, label embeddings for pairing are computed per batch in sorted
order, and torch runs on one CPU thread, set by the engines (matrix products on 1 and 2 threads differ
in the last bits). This is what makes a resumed, a multi-worker and a Ray build byte-identical.

`ShardComputer` holds the encoders. In worker processes and Ray actors it is rebuilt
from `ShardComputer.config`, a plain JSON-able dict (encoder specs, settings), never from
pickled objects.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from reme.errors import ImageReadError
from reme.io import read_image
from reme.build.nounphrases import NON_OBJECT_ROOTS, NounPhrase, extract_noun_phrases, load_spacy
from reme.build.pairing import pair_labels_to_segments
from reme.encoders.pooling import embed_proposals
from reme.proposals import (FelzenszwalbParams, ProposalGenerator, check_proposal_method, majority_pieces,
                            masks_bboxes)
from reme.build._shards import encode_shard, pairs_table, segments_table
from reme.encoders.text import TEMPLATES, embed_labels

logger = logging.getLogger(__name__)

#: Default largest image size, in pixels, fed to the per-image stages (4096 x 4096). Larger
#: photos are downscaled in caption mode (JPEGs decoded at reduced size) and skipped in GT
#: mode, whose annotations are in full-resolution pixels. Our choice: Felzenszwalb takes about
#: 3 s for a 0.3 MP COCO photo here, so 16.7 MP is already minutes per image.
MAX_BUILD_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class StageSettings:
    """Settings of the per-image stages (everything that changes a shard's contents).

    Attributes:
        mode: ``"gt"`` or ``"caption"``.
        felzenszwalb: Felzenszwalb settings (step 1).
        proposals: step 1 method, ``"felzenszwalb"``, ``"cluster"`` or ``"sam[:MODEL]"``
            ([`reme.proposals.ProposalGenerator`][reme.proposals.ProposalGenerator]); GT mode uses
            it with ``gt_segments="proposals"``.
        n_clusters: k of ``"cluster"`` proposals.
        sam_options: keywords of
            [`reme.proposals.sam.SamProposals`][reme.proposals.sam.SamProposals].
        batch_size: images per encoder / captioner / spaCy batch inside a shard.
        max_image_pixels: larger images are downscaled (caption) or skipped (GT); None: no
            limit below `reme.io.MAX_PIXELS`.
        gt_segments: GT mode, ``"proposals"`` or ``"masks"``.
        min_purity: GT mode, minimum majority-label fraction of a proposal.
        background_label: GT mode, name of unannotated pixels (None: dropped).
        exclude_labels: GT mode, label names left out.
        keep_compounds: caption mode, compound modifiers stay in the root (step 3).
        stop_roots: caption mode, roots that are not labels (step 3,
            `reme.build.nounphrases.NON_OBJECT_ROOTS` by default), matched on the root used.
        templates: caption mode, prompt templates of the pairing label embeddings (step 5).
    """

    mode: str
    felzenszwalb: FelzenszwalbParams = FelzenszwalbParams()
    proposals: str = "felzenszwalb"
    n_clusters: int = 8
    sam_options: dict = field(default_factory=dict)
    batch_size: int = 8
    max_image_pixels: int | None = MAX_BUILD_PIXELS
    gt_segments: str = "proposals"
    min_purity: float = 0.5
    background_label: str | None = None
    exclude_labels: tuple[str, ...] = ()
    keep_compounds: bool = True
    stop_roots: tuple[str, ...] = tuple(sorted(NON_OBJECT_ROOTS))
    templates: tuple[str, ...] = field(default=TEMPLATES)

    def __post_init__(self) -> None:
        if self.mode not in ("gt", "caption"):
            raise ValueError(f"mode must be 'gt' or 'caption', got {self.mode!r}")
        if self.gt_segments not in ("proposals", "masks"):
            raise ValueError(f"segments must be 'proposals' or 'masks', got {self.gt_segments!r}")
        check_proposal_method(self.proposals)
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_image_pixels is not None and int(self.max_image_pixels) < 1:
            raise ValueError(f"max_image_pixels must be >= 1 or None, got {self.max_image_pixels}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sam_options"] = dict(sorted(self.sam_options.items()))
        d["exclude_labels"] = sorted(self.exclude_labels)
        d["templates"] = list(self.templates)
        d["stop_roots"] = sorted(self.stop_roots)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageSettings":
        d = dict(d)
        d["felzenszwalb"] = FelzenszwalbParams(**d["felzenszwalb"])
        d["exclude_labels"] = tuple(d.get("exclude_labels", ()))
        d["templates"] = tuple(d.get("templates", TEMPLATES))
        d["stop_roots"] = tuple(d.get("stop_roots", sorted(NON_OBJECT_ROOTS)))
        return cls(**d)


# ------------------------------------------------------------------------ encoder recipes
#: Constructor knobs that `encoder_recipe` forwards to the loader when rebuilding.
_REBUILD_KNOBS = ("image_size", "stride", "prompt", "max_new_tokens")


def encoder_fingerprint(enc) -> dict[str, Any]:
    """Identity of an encoder or captioner: class, spec, dim and its public scalar
    attributes (e.g. ``image_size``); a caption file adds its sha256."""
    fp: dict[str, Any] = {"class": f"{type(enc).__module__}.{type(enc).__qualname__}",
                          "spec": getattr(enc, "spec", None)}
    for k, v in sorted(vars(enc).items()):
        if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str))):
            fp[k] = v
    path = getattr(enc, "path", None)
    if isinstance(path, Path) and path.is_file():
        fp["file_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return fp


def encoder_recipe(enc) -> dict[str, Any]:
    """Plain-dict recipe to rebuild ``enc`` with
    [`reme.encoders.resolve_encoder`][reme.encoders.resolve_encoder]."""
    spec = getattr(enc, "spec", None)
    if not isinstance(spec, str):
        raise ValueError(f"{type(enc).__name__} has no spec string; worker processes and Ray actors "
                         "rebuild encoders from specs (use encoders from reme.encoders.resolve_encoder)")
    kwargs = {k: getattr(enc, k) for k in _REBUILD_KNOBS
              if isinstance(getattr(enc, k, None), (int, float, str)) and not isinstance(getattr(enc, k), bool)}
    return {"spec": spec, "kwargs": kwargs, "fingerprint": encoder_fingerprint(enc)}


def encoder_from_recipe(recipe: dict[str, Any], device: str):
    """Rebuild an encoder from `encoder_recipe` and check that it is the same one.

    Raises:
        ValueError: the rebuilt encoder's fingerprint differs (settings the spec cannot carry).
    """
    from reme.encoders import resolve_encoder
    from reme.encoders.factory import encoder_loader

    params = inspect.signature(encoder_loader(recipe["spec"])).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in recipe.get("kwargs", {}).items() if var_kw or k in params}
    enc = resolve_encoder(recipe["spec"], device=device, **kwargs)
    fp = encoder_fingerprint(enc)
    want = recipe.get("fingerprint")
    if want is not None and fp != want:
        diff = sorted(k for k in set(fp) | set(want) if fp.get(k) != want.get(k))
        raise ValueError(
            f"encoder {recipe['spec']!r} rebuilt in a worker differs from the caller's in {diff}; "
            "build with workers=1 (engine 'local') or with encoders created by resolve_encoder(spec)"
        )
    return enc


def nlp_name(nlp) -> str:
    """Package name of a loaded spaCy pipeline (``lang_name``), for recipes and fingerprints."""
    meta = getattr(nlp, "meta", {}) or {}
    return f"{meta.get('lang', 'en')}_{meta.get('name', 'unknown')}"


def nlp_fingerprint(nlp) -> dict[str, Any]:
    meta = getattr(nlp, "meta", {}) or {}
    return {"name": nlp_name(nlp), "version": meta.get("version"), "pipes": list(getattr(nlp, "pipe_names", []))}


def _chunks(seq: Sequence[str], n: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


class _ShardOut:
    """Columns of one shard under construction."""

    def __init__(self, dim: int):
        self.dim = dim
        self.image: list[str] = []
        self.bbox: list[np.ndarray] = []
        self.area: list[np.ndarray] = []
        self.source: list[str] = []
        self.emb: list[np.ndarray] = []
        self.pair_seg: list[int] = []
        self.label: list[str] = []
        self.root: list[str] = []
        self.head: list[str] = []
        self.score: list[float] = []

    def add_segments(self, key: str, S: np.ndarray, bbox: np.ndarray, area: np.ndarray, source: str,
                     scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
        start = len(self.image)
        bbox = np.asarray(bbox, np.int64).reshape(-1, 4)
        area = np.asarray(area, np.int64)
        if scale != (1.0, 1.0):  # downscaled image: boxes and areas back in source pixels
            sy, sx = scale
            bbox = np.round(bbox * np.array([sx, sy, sx, sy])).astype(np.int64)
            area = np.round(area * sx * sy).astype(np.int64)
        self.image.extend([key] * len(S))
        self.source.extend([source] * len(S))
        self.bbox.append(bbox.astype(np.int32))
        self.area.append(area)
        self.emb.append(np.asarray(S, np.float32).reshape(-1, self.dim))
        return np.arange(start, start + len(S))

    def tables(self):
        emb = np.concatenate(self.emb) if self.emb else np.zeros((0, self.dim), np.float32)
        bbox = np.concatenate(self.bbox) if self.bbox else np.zeros((0, 4), np.int32)
        area = np.concatenate(self.area) if self.area else np.zeros(0, np.int64)
        return (segments_table(self.image, bbox, area, self.source, emb),
                pairs_table(self.pair_seg, self.label, self.root, self.head,
                            self.score if len(self.score) == len(self.label) else None))


class ShardComputer:
    """Computes the per-image stages of one shard.

    Args:
        settings: `StageSettings`.
        image_root: folder the image keys are relative to.
        visual_encoder: VisualEncoder for S_ref (and the group filter).
        annotations: GT mode, `reme.build.annotations.CocoInstances` or ``MaskFolder``.
        captioner: caption mode, a Captioner.
        pairing_model: caption mode, a CLIPModel (step 4).
        nlp: caption mode, a spaCy pipeline (default
            [`reme.build.nounphrases.load_spacy`][reme.build.nounphrases.load_spacy]).
    """

    def __init__(self, settings: StageSettings, image_root: str | Path, visual_encoder, *, annotations=None,
                 captioner=None, pairing_model=None, nlp=None):
        self.settings = settings
        self.image_root = Path(image_root)
        self.visual = visual_encoder
        self.annotations = annotations
        self.captioner = captioner
        self.pairing = pairing_model
        self.proposer = ProposalGenerator(settings.proposals, felzenszwalb=settings.felzenszwalb,
                                          n_clusters=settings.n_clusters, sam_options=settings.sam_options,
                                          device=getattr(visual_encoder, "device", None))
        if settings.mode == "gt":
            if annotations is None:
                raise ValueError("GT mode needs annotations")
            names = list(annotations.label_names)
            if settings.background_label:
                names.append(settings.background_label)
            self.names = names
            self.bg_index = len(names) - 1 if settings.background_label else None
            excluded = set(settings.exclude_labels)
            self.excluded_ids = [i for i, n in enumerate(names) if n in excluded]
            self.nlp = None
        else:
            if captioner is None or pairing_model is None:
                raise ValueError("caption mode needs a captioner and a pairing model")
            self.nlp = nlp or load_spacy()

    # ------------------------------------------------------------------ recipes
    def config(self, device: str | None = None) -> dict[str, Any]:
        """Plain JSON-able recipe of this computer for worker processes and Ray actors.

        Raises:
            ValueError: an encoder has no spec string.
        """
        dev = device or str(getattr(self.visual, "device", "cpu"))
        cfg: dict[str, Any] = {"settings": self.settings.to_dict(), "image_root": str(self.image_root.resolve()),
                               "device": dev, "visual": encoder_recipe(self.visual)}
        if self.settings.mode == "gt":
            cfg["annotations"] = self.annotations.config()
        else:
            cfg.update({"captioner": encoder_recipe(self.captioner), "pairing": encoder_recipe(self.pairing),
                        "nlp": nlp_name(self.nlp)})
        return cfg

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ShardComputer":
        """Rebuild from `config` (loads the encoders on ``cfg["device"]``)."""
        from reme.build.annotations import annotations_from_config

        settings = StageSettings.from_dict(cfg["settings"])
        dev = cfg.get("device", "cpu")
        visual = encoder_from_recipe(cfg["visual"], dev)
        if settings.mode == "gt":
            return cls(settings, cfg["image_root"], visual, annotations=annotations_from_config(cfg["annotations"]))
        return cls(settings, cfg["image_root"], visual, captioner=encoder_from_recipe(cfg["captioner"], dev),
                   pairing_model=encoder_from_recipe(cfg["pairing"], dev), nlp=load_spacy(cfg.get("nlp")))

    # ------------------------------------------------------------------ computing
    def compute_encoded(self, index: int, keys: Sequence[str]) -> tuple[bytes, bytes, dict[str, Any]]:
        """Shard ``index`` over ``keys``: (segments Parquet bytes, pairs Parquet bytes, marker)."""
        seg, pairs, meta = self.compute(keys)
        meta = {"shard": int(index), **meta}
        return encode_shard(seg, pairs, meta)

    @torch.inference_mode()
    def compute(self, keys: Sequence[str]):
        """Per-image stages of ``keys``: (segments table, pairs table, meta dict).

        Bad images are skipped with a warning and listed in ``meta["skipped"]``. Bitwise
        reproducible on one torch/BLAS thread: the engines run it so (worker processes and Ray
        actors set one thread at start, the in-process path under a scoped `threadpoolctl` limit).
        """
        if self.settings.mode == "gt":
            return self._gt(keys)
        return self._caption(keys)

    def _read(self, key: str, skipped: list, downscaled: list):
        """(image, (sy, sx)) or None (skipped with a warning)."""
        limit = self.settings.max_image_pixels
        try:
            img, (H0, W0) = read_image(self.image_root / key, max_pixels=limit)
        except ImageReadError as exc:
            logger.warning("skipping %s: %s", key, exc)
            skipped.append({"image": key, "reason": str(exc)})
            return None
        H, W = img.shape[:2]
        if (H, W) != (H0, W0):
            if self.settings.mode == "gt":
                reason = (f"{W0}x{H0} exceeds max_image_pixels={limit}; GT annotations are in full-resolution "
                          "pixels, so GT mode does not downscale (raise --max-image-pixels or resize images and "
                          "annotations together)")
                logger.warning("skipping %s: %s", key, reason)
                skipped.append({"image": key, "reason": reason})
                return None
            downscaled.append({"image": key, "from": [H0, W0], "to": [H, W]})
            return img, (H0 / H, W0 / W)
        return img, (1.0, 1.0)

    def _gt(self, keys: Sequence[str]):
        st, names = self.settings, self.names
        out = _ShardOut(self.visual.dim)
        skipped: list[dict] = []
        downscaled: list[dict] = []
        n_pairs = 0
        for batch in _chunks(list(keys), st.batch_size):
            loaded = []
            for key in batch:
                r = self._read(key, skipped, downscaled)
                if r is None:
                    continue
                img = r[0]
                try:
                    gt = self.annotations.label_map(key, img.shape[:2])
                except (FileNotFoundError, ValueError) as exc:
                    logger.warning("skipping %s: %s", key, exc)
                    skipped.append({"image": key, "reason": str(exc)})
                    continue
                loaded.append((key, img, gt))
            if not loaded:
                continue
            feats = self.visual.dense_features_batch([img for _, img, _ in loaded])
            for (key, img, gt), f in zip(loaded, feats):
                if st.gt_segments == "proposals":
                    if self.bg_index is not None:
                        gt = np.where(gt == -1, self.bg_index, gt)
                    props = self.proposer(img, f)                                         # step 1
                    keep, lab = majority_pieces(props, gt, len(names), st.min_purity)
                    area = props.areas()
                    keep &= ~np.isin(lab, self.excluded_ids)
                    if not keep.any():
                        continue
                    S = embed_proposals(self.visual, f, props, img).cpu().numpy()[keep]
                    rows = out.add_segments(key, S, props.bboxes()[keep], area[keep], "gt_proposal")
                    labels = [names[i] for i in lab[keep]]
                else:
                    excl = set(self.excluded_ids)
                    regions = [(gt == li, li) for li in np.unique(gt[gt >= 0]) if li not in excl]
                    if hasattr(self.annotations, "instance_masks"):
                        regions = [(m, li) for m, li, crowd in self.annotations.instance_masks(key, img.shape[:2])
                                   if not crowd and m.any() and li not in excl]
                    if not regions:
                        continue
                    masks = np.stack([m for m, _ in regions])
                    S = self.visual.mask_embeddings(f, masks, image=img).cpu().numpy()
                    boxes = masks_bboxes(masks)
                    rows = out.add_segments(key, S, boxes, masks.reshape(len(masks), -1).sum(1), "gt_mask")
                    labels = [names[li] for _, li in regions]
                out.pair_seg.extend(rows.tolist())
                out.label.extend(labels)
                out.root.extend(labels)
                out.head.extend(labels)
                n_pairs += len(labels)
        seg_t, pair_t = out.tables()
        meta = {"counts": {"images": len(keys), "images_skipped": len(skipped), "gt_segments": n_pairs},
                "skipped": skipped, "downscaled": downscaled}
        return seg_t, pair_t, meta

    def _captions(self, imgs: list[np.ndarray], keys: list[str]) -> list[list[str]]:
        batch_fn = getattr(self.captioner, "caption_batch", None)
        caps = batch_fn(imgs, keys=keys) if callable(batch_fn) else [self.captioner.caption(im, key=k)
                                                                         for im, k in zip(imgs, keys)]
        return [[c.strip() for c in cs if isinstance(c, str) and c.strip()] for cs in caps]

    def _caption(self, keys: Sequence[str]):
        st = self.settings
        out = _ShardOut(self.visual.dim)
        skipped: list[dict] = []
        downscaled: list[dict] = []
        cache: dict[str, np.ndarray] = {}
        c = {"images": len(keys), "images_skipped": 0, "images_without_captions": 0, "captions": 0,
             "noun_phrases": 0, "proposals": 0, "paired_segments": 0, "pairs": 0}
        for batch in _chunks(list(keys), st.batch_size):
            loaded = []
            for key in batch:
                r = self._read(key, skipped, downscaled)
                if r is not None:
                    loaded.append((key, *r))
            if not loaded:
                continue
            caps = self._captions([img for _, img, _ in loaded], [k for k, _, _ in loaded])  # step 2
            flat = [x for cs in caps for x in cs]
            parsed = extract_noun_phrases(flat, self.nlp, keep_compounds=st.keep_compounds,   # step 3
                                          stop_roots=frozenset(st.stop_roots))
            work = []
            pos = 0
            for (key, img, scale), cs in zip(loaded, caps):
                c["captions"] += len(cs)
                if not cs:
                    c["images_without_captions"] += 1
                per = parsed[pos:pos + len(cs)]
                pos += len(cs)
                phrases: list[NounPhrase] = list({p.text: p for ps in per for p in ps}.values())
                if phrases:
                    c["noun_phrases"] += len(phrases)
                    work.append((key, img, scale, phrases))
            if not work:
                continue
            new = sorted({p.text for *_, ps in work for p in ps} - cache.keys())
            if new:
                cache.update(zip(new, embed_labels(self.pairing, new, st.templates)))
            imgs = [w[1] for w in work]
            clip_feats = self.pairing.dense_features_batch(imgs)
            vis_feats = self.visual.dense_features_batch(imgs)
            for (key, img, scale, phrases), fc, fv in zip(work, clip_feats, vis_feats):
                props = self.proposer(img, fv)                                                # step 1
                c["proposals"] += props.num
                S_clip = embed_proposals(self.pairing, fc, props, img).cpu().numpy()          # step 4
                L_clip = np.stack([cache[p.text] for p in phrases])
                best, sim = pair_labels_to_segments(S_clip, L_clip)
                picked = np.unique(best)
                S_vis = embed_proposals(self.visual, fv, props, img).cpu().numpy()[picked]    # step 6
                rows = out.add_segments(key, S_vis, props.bboxes()[picked], props.areas()[picked],
                                        "caption_pairing", scale)
                row_of = dict(zip(picked.tolist(), rows.tolist()))
                out.pair_seg.extend(row_of[b] for b in best.tolist())
                out.label.extend(p.text for p in phrases)
                out.root.extend(p.root for p in phrases)
                out.head.extend(p.head for p in phrases)
                out.score.extend(sim.tolist())
                c["paired_segments"] += len(picked)
                c["pairs"] += len(phrases)
        c["images_skipped"] = len(skipped)
        seg_t, pair_t = out.tables()
        return seg_t, pair_t, {"counts": c, "skipped": skipped, "downscaled": downscaled}
