"""``reme build-reference``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer

from reme.defaults import MAX_BUILD_PIXELS

from reme.cli._common import (CLASSES_FILE_HELP, QUIET_HELP, VERBOSE_HELP, app, check_out_path,
                              fail, setup_logging)

logger = logging.getLogger("reme")


@app.command("build-reference", short_help="Build a reference set from photos (docs/method.md Part 1).")
def build_reference_cmd(
    images: Path = typer.Option(..., "--images", help="Folder of photos (searched recursively)."),
    out: Path = typer.Option(..., "--out", help="Output reference folder."),
    annotations: Optional[Path] = typer.Option(None, help="GT mode: COCO instances JSON."),
    masks: Optional[Path] = typer.Option(None, help="GT mode: folder of index-PNG masks (same stems as images)."),
    yolo_labels: Optional[Path] = typer.Option(None, help="GT mode: folder of YOLO label files (same stems as images; "
                                               "polygons or boxes, class k = line k of --classes-file)."),
    classes_file: Optional[Path] = typer.Option(None, help="GT mode with --masks or --yolo-labels: " + CLASSES_FILE_HELP
                                                + " The first name is the label."),
    gt_segments: str = typer.Option("proposals", help="GT mode: 'proposals' (--proposals, majority label) or 'masks'."),
    background_label: Optional[str] = typer.Option(None, help="GT mode: label for unannotated pixels."),
    exclude_label: List[str] = typer.Option([], help="GT mode: label names to leave out (repeatable)."),
    captions: Optional[Path] = typer.Option(None, help="Caption mode: JSON-lines caption file (skips captioning)."),
    captioner: str = typer.Option("llava-1.5-7b", help="Caption mode: captioner spec (llava-1.5-7b, blip-base, ...)."),
    pairing_encoder: str = typer.Option("clip-vit-b-16", help="Caption mode: CLIP spec for pairing (step 4)."),
    visual_encoder: str = typer.Option("dinov2-vitl14", help="Visual encoder for S_ref ('classical' works offline)."),
    gfa_with: Optional[str] = typer.Option(None, help="Fuse a second visual encoder into S_ref per segment with a GFA "
                                           "random walk (OVSNet), e.g. clip-vit-b-16; same as --visual-encoder "
                                           "gfa:VISUAL+SECOND@OMEGA. 'reme segment' reads it from the manifest."),
    gfa_omega: float = typer.Option(0.5, help="With --gfa-with: fusion degree omega in [0, 1)."),
    text_encoder: Optional[str] = typer.Option(None, help="Text encoder for L_ref (default: the pairing CLIP; GT mode: minilm)."),
    felzenszwalb: str = typer.Option("default", help="Felzenszwalb preset: default, voc, coco-stuff, cityscapes."),
    proposals: str = typer.Option("felzenszwalb", help="Step 1 proposals: felzenszwalb, cluster (Split Matching k-means "
                                  "over the visual features) or sam[:MODEL] (SAM automatic masks; hub id or folder). "
                                  "'reme segment' uses the same by default."),
    n_clusters: int = typer.Option(8, help="k of --proposals cluster."),
    sam_points_per_side: int = typer.Option(32, help="SAM point grid (N x N) of --proposals sam."),
    drop_rate: float = typer.Option(0.30, help="delta_filter of the group-median filter (step 7)."),
    adaptive_filter: bool = typer.Option(False, help="Adaptive per-group drop rate in [0, 50%] (step 7 variant)."),
    group_filter: bool = typer.Option(True, help="Run the group-median filter (step 7)."),
    knee_filter: bool = typer.Option(True, help="Run the ambiguous-label knee filter (step 8)."),
    k_sim: int = typer.Option(30, help="Synonym pairs added (step 9); 0 disables."),
    filter_method: str = typer.Option("median", help="Step 7 criterion: median (paper), clip_global or clip_group "
                                      "(lowest CLIP pairing scores; the paper's baselines)."),
    relabel: bool = typer.Option(False, help="Relabel step-7 drops to the nearest kept group centre instead of dropping."),
    embedding_dtype: str = typer.Option("float16", help="Storage dtype of S_ref: float16 or float32."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: CUDA if available)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    workers: int = typer.Option(0, help="Worker processes (local engine; one torch thread each) or Ray actors for "
                                "the per-image stages; 0 = auto: one per core the thread policy gives "
                                "($REME_THREADS, else the idle cores) on a CPU, 1 with CUDA or Ray."),
    batch_size: int = typer.Option(8, help="Images per encoder / captioner / spaCy batch."),
    shard_size: int = typer.Option(32, help="Images per shard (the unit of resumption)."),
    engine: str = typer.Option("local", help="'local' (this machine) or 'ray' (Ray Data; pip install \"reme[ray]\")."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address for --engine ray (default: local Ray)."),
    work_dir: Optional[Path] = typer.Option(None, help="Folder for shards (default: OUT.work, removed after success)."),
    resume: bool = typer.Option(True, help="Reuse finished shards of an interrupted run with the same settings."),
    keep_work_dir: bool = typer.Option(False, help="Keep the shards after a successful build."),
    max_image_pixels: int = typer.Option(MAX_BUILD_PIXELS, help="Larger images are downscaled (caption) or skipped (GT); 0 = no limit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Build a reference set {S_ref, O_ref, L_ref} from photos (docs/method.md Part 1)."""
    setup_logging(quiet, verbose)
    from reme.build.annotations import CocoInstances, MaskFolder
    from reme.classes import read_class_file
    from reme.build.pipeline import CaptionBuildParams, build_caption_reference, build_gt_reference
    from reme.encoders import resolve_encoder
    from reme.errors import MissingWeightsError
    from reme.proposals import FelzenszwalbParams

    if workers < 0:
        fail(f"--workers must be >= 0 (0 = auto), got {workers}")
    if out.exists() and not overwrite:
        fail(f"{out} exists; pass --overwrite to replace it")
    check_out_path(out, folder_itself=False)
    if annotations and masks:
        fail("give either --annotations or --masks, not both")
    if yolo_labels and (annotations or masks):
        fail("give only one of --annotations, --masks and --yolo-labels")
    if yolo_labels and not classes_file:
        fail("--yolo-labels needs --classes-file")
    run_opts = dict(out=out, overwrite=overwrite, embedding_dtype=embedding_dtype, workers=workers,
                    batch_size=batch_size, shard_size=shard_size, engine=engine, ray_address=ray_address,
                    work_dir=work_dir, resume=resume, keep_work_dir=keep_work_dir or None,
                    max_image_pixels=max_image_pixels or None)
    try:
        fz = FelzenszwalbParams.preset(felzenszwalb)
        step1 = dict(proposals=proposals, n_clusters=n_clusters,
                     sam_options={"points_per_side": sam_points_per_side} if proposals.startswith("sam") else None)
        gt_mode = bool(annotations or masks or yolo_labels)
        vis = resolve_encoder(f"gfa:{visual_encoder}+{gfa_with}@{gfa_omega}" if gfa_with else visual_encoder,
                              device=device)
        if not workers:
            from reme.cli.threads import build_workers

            run_opts["workers"] = build_workers(getattr(vis, "device", "cpu"), engine)
        if gt_mode:
            if masks and not classes_file:
                fail("--masks needs --classes-file")
            if yolo_labels:
                from reme.build.annotations import YoloLabels

                ann = YoloLabels(yolo_labels, [c[0] for c in read_class_file(classes_file, indexed=True)])
            else:
                ann = CocoInstances(annotations) if annotations else MaskFolder(masks, [c[0] for c in read_class_file(classes_file, indexed=True)])
            txt = resolve_encoder(text_encoder or "minilm", device=device)
            ref = build_gt_reference(images, ann, vis, txt, segments=gt_segments, felzenszwalb=fz, **step1,
                                     background_label=background_label, exclude_labels=exclude_label,
                                     progress=not quiet, **run_opts)
        else:
            cap = resolve_encoder(f"captions:{captions}" if captions else captioner, device=device)
            clip = resolve_encoder(pairing_encoder, device=device)
            txt = resolve_encoder(text_encoder, device=device) if text_encoder else clip
            params = CaptionBuildParams(drop_rate=drop_rate, adaptive_filter=adaptive_filter,
                                        group_filter=group_filter, knee_filter=knee_filter, k_sim=k_sim,
                                        filter_method=filter_method, relabel=relabel)
            ref = build_caption_reference(images, cap, clip, vis, txt, params=params, felzenszwalb=fz, **step1,
                                          progress=not quiet, **run_opts)
    except (MissingWeightsError, FileNotFoundError, ValueError, ImportError, OSError) as exc:
        fail(str(exc))
    typer.echo(json.dumps({"reference": str(out), **ref.manifest["counts"]}))
