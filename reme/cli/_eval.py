"""``reme eval`` and ``reme ablate``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from reme.checks import MAX_LOGIT_SCALE
from reme.defaults import LOGIT_SCALE, PROPOSAL_PIXELS, TOP_K

from reme.cli._common import (CLASSES_FILE_HELP, PROPOSAL_PIXELS_HELP, QUIET_HELP, VERBOSE_HELP, app, check_options,
                              existing_overlay, fail, segmenter_kw, setup_logging)

logger = logging.getLogger("reme")


_EVAL_DATASETS = "voc21, voc20, pc60, pc59, pc459, coco_object, coco_stuff171, cityscapes, ade150, ade847 or generic"


# Options `eval` and `ablate` share (the same evaluation-data selection and protocol).
RootOpt = Annotated[Optional[Path], typer.Option(
    help="Dataset root, or a detectron2 datasets root holding it (folder trees: docs/evaluation.md).")]
ImagesOpt = Annotated[Optional[Path], typer.Option(
    help="Evaluation image folder (generic; overrides a benchmark's layout).")]
MasksOpt = Annotated[Optional[Path], typer.Option(
    help="Evaluation index-mask folder, same stems (generic; overrides the layout).")]
ClassesFileOpt = Annotated[Optional[Path], typer.Option(help="Generic evaluation data: " + CLASSES_FILE_HELP)]
LimitOpt = Annotated[Optional[int], typer.Option(help="Evaluate the first N images (after any --offset and --stride).")]
StrideOpt = Annotated[int, typer.Option(help="Use every N-th evaluation image.")]
ShortSideOpt = Annotated[Optional[int], typer.Option(
    help="Short side in pixels (default: the benchmark's; 0 = native).")]
ModeOpt = Annotated[Optional[str], typer.Option(help="Inference: whole (default) or slide.")]


def _eval_protocol_kw(short_side, mode, crop, window_stride, background_mode, bg_threshold, others_threshold,
                      no_synonyms) -> dict:
    return dict(short_side=short_side, mode=mode, crop=crop, window_stride=window_stride, background=background_mode,
                bg_threshold=bg_threshold, others_threshold=others_threshold, synonyms=not no_synonyms)


@app.command("eval", short_help="Evaluate on a benchmark: mIoU, per-class IoU.")
def eval_cmd(
    dataset: Optional[str] = typer.Option(None, "--dataset", help=f"Benchmark: {_EVAL_DATASETS} (or --suite)."),
    root: RootOpt = None,
    layout: Optional[str] = typer.Option(None, help="Benchmark tree: mmseg, detectron2 or flat (default: detect)."),
    suite: Optional[str] = typer.Option(None, help="'paper': every benchmark of the paper under --data-root, "
                                        "resumable, with a summary beside the published numbers."),
    data_root: Optional[Path] = typer.Option(None, help="--suite: datasets root (default $DETECTRON2_DATASETS, "
                                             "else ./datasets)."),
    reference: Optional[Path] = typer.Option(None, help="Reference folder (default: the embedded one)."),
    out: Optional[Path] = typer.Option(None, help="Output folder: results.json, results.md, confusion.png, vis/ "
                                       "(--suite: one folder per benchmark + summary.md/json; default eval_paper)."),
    split: Optional[str] = typer.Option(None, help="Benchmark split (default val / validation)."),
    images: ImagesOpt = None,
    masks: MasksOpt = None,
    classes_file: ClassesFileOpt = None,
    ignore_index: Optional[int] = typer.Option(None, help="Mask value to ignore (generic default 255)."),
    reduce_zero_label: bool = typer.Option(False, help="Generic: ignore mask value 0 and shift the others down."),
    background: Optional[str] = typer.Option(None, help="Generic: name of the background class (set by threshold)."),
    limit: LimitOpt = None,
    stride: StrideOpt = 1,
    offset: int = typer.Option(0, help="Skip the first N images (sorted by name)."),
    short_side: ShortSideOpt = None,
    mode: ModeOpt = None,
    crop: Optional[int] = typer.Option(None, help="Sliding-window size (default 336)."),
    window_stride: Optional[int] = typer.Option(None, help="Sliding-window step (default 112)."),
    background_mode: Optional[str] = typer.Option(None, help="class+threshold (default of VOC-21, PC-60, COCO-Object), threshold or class."),
    bg_threshold: Optional[float] = typer.Option(None, help="Background confidence threshold (default: the mode's, reme.eval.protocol)."),
    others_threshold: Optional[float] = typer.Option(None, help="Answer 'others' below this confidence."),
    no_synonyms: bool = typer.Option(False, "--no-synonyms", help="Query display names only (no synonym max)."),
    vis: int = typer.Option(4, help="Side-by-side PNGs for the first N images."),
    distractors: Optional[str] = typer.Option(None, help="Also run the distractor sweep, e.g. 0,10,50,150,500."),
    overlap: bool = typer.Option(False, help="Also report the vocabulary overlap with the reference labels."),
    bg_sweep: Optional[str] = typer.Option(None, help="Also score these background thresholds, e.g. 0.3,0.5,0.7."),
    hold_out: Optional[str] = typer.Option(None, help="'others' analysis: comma-separated classes to hold out."),
    others_sweep: Optional[str] = typer.Option(None, help="'others' thresholds of that analysis (default 0,0.3,...,0.7)."),
    top_k: Optional[int] = typer.Option(None, help=f"Retrieval top-k (default {TOP_K}; 0 = all)."),
    segment_logit_scale: Optional[float] = typer.Option(None, help=f"tau1 of eq. 1 (default {LOGIT_SCALE:g}; at most {MAX_LOGIT_SCALE:g})."),
    label_logit_scale: Optional[float] = typer.Option(None, help=f"tau2 of eq. 2 (default {LOGIT_SCALE:g}; at most {MAX_LOGIT_SCALE:g})."),
    retrieval: Optional[str] = typer.Option(None, help="Eq. 1 search: exact (default) or topk (FAISS index)."),
    proposals: Optional[str] = typer.Option(None, help="felzenszwalb, cluster or sam[:MODEL] (default: the reference set's)."),
    n_clusters: Optional[int] = typer.Option(None, help="k of --proposals cluster."),
    smooth_omega: Optional[float] = typer.Option(None, help="GFA smoothing of P_seg over adjacent segments, in [0, 1)."),
    proposal_pixels: int = typer.Option(PROPOSAL_PIXELS or 0, help=PROPOSAL_PIXELS_HELP),
    overlay_dir: Optional[Path] = typer.Option(None, "--overlay", help="Also search the examples of this overlay "
                                               "folder ('reme add-examples'); it must exist."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: CUDA if available)."),
    ask: Optional[str] = typer.Option(None, help="Subset-query protocol instead: ask only these classes "
                                      "(comma-separated display names); report forced share and asked IoU, "
                                      "with and without 'none of these' (docs/results.md)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Evaluate a reference set on a benchmark: mIoU, per-class IoU, pixel/mean accuracy."""
    setup_logging(quiet, verbose)
    check_options(top_k=top_k, smooth_omega=smooth_omega or 0.0, retrieval=retrieval or "exact", proposals=proposals,
                  n_clusters=n_clusters, others_threshold=others_threshold, segment_logit_scale=segment_logit_scale,
                  label_logit_scale=label_logit_scale, proposal_pixels=proposal_pixels)
    if ask is not None:  # subset-query protocol (reme.eval.subset)
        _eval_subset(ask, dataset, root, split, images, masks, classes_file, ignore_index, reduce_zero_label, limit,
                     stride, offset, reference, device, quiet,
                     segmenter_kw(top_k, segment_logit_scale, label_logit_scale, proposal_pixels, retrieval=retrieval,
                                  proposals=proposals, n_clusters=n_clusters, smooth_omega=smooth_omega))
        return
    from reme.defaults import default_reference_path
    from reme.errors import MissingWeightsError, ReferenceSetError
    from reme.eval.commands import run_eval, run_eval_suite

    if (dataset is None) == (suite is None):
        fail("give --dataset NAME or --suite paper (not both)")
    seg_kw = segmenter_kw(top_k, segment_logit_scale, label_logit_scale, proposal_pixels, retrieval=retrieval,
                          proposals=proposals, n_clusters=n_clusters, smooth_omega=smooth_omega,
                          overlay=overlay_dir and existing_overlay(overlay_dir))
    protocol_kw = _eval_protocol_kw(short_side, mode, crop, window_stride, background_mode, bg_threshold,
                                    others_threshold, no_synonyms)
    if suite is not None:
        try:
            text = run_eval_suite(suite=suite, reference=reference or default_reference_path(), out=out,
                                  data_root=data_root, layout=layout, limit=limit, protocol_kw=protocol_kw,
                                  vis=vis, segmenter_kw=seg_kw, device=device, progress=not quiet)
        except (MissingWeightsError, ReferenceSetError, FileNotFoundError, ValueError) as exc:
            fail(str(exc))
        typer.echo(text)
        return
    try:
        text = run_eval(dataset=dataset, reference=reference or default_reference_path(), out=out, root=root,
                        split=split, images=images, masks=masks, classes_file=classes_file, ignore_index=ignore_index,
                        reduce_zero_label=reduce_zero_label, background_name=background, limit=limit, stride=stride,
                        offset=offset, protocol_kw=protocol_kw, vis=vis, distractors=distractors, overlap=overlap,
                        bg_sweep=bg_sweep, hold_out=hold_out, others_sweep=others_sweep, segmenter_kw=seg_kw,
                        device=device, progress=not quiet, layout=layout)
    except (MissingWeightsError, ReferenceSetError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(text)


def _eval_subset(ask, dataset, root, split, images, masks, classes_file, ignore_index, reduce_zero_label, limit, stride,
                 offset, reference, device, quiet, kw) -> None:
    """``reme eval --ask``: the subset-query protocol (`reme.eval.subset.run_subset_eval`)."""
    from reme.defaults import default_reference_path
    from reme.errors import MissingWeightsError, ReferenceSetError
    from reme.eval import open_dataset
    from reme.eval.subset import parse_asked, run_subset_eval, subset_markdown
    from reme.inference.segmenter import Segmenter

    try:
        ds = open_dataset(dataset, root, split=split, images=images, masks=masks, classes_file=classes_file,
                          ignore_index=ignore_index, reduce_zero_label=(reduce_zero_label or None)
                          if dataset == "generic" else None, limit=limit, stride=stride, offset=offset)
        asked = parse_asked(ask, ds.names)
        seg = Segmenter(reference or default_reference_path(), device=device, **kw)
        result = run_subset_eval(seg, ds, asked, progress=not quiet)
    except (MissingWeightsError, ReferenceSetError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(subset_markdown(result, ds.name))


@app.command("ablate", short_help="Evaluate reference-set variants, one table.")
def ablate_cmd(
    kind: str = typer.Option("noisy-gt", help="noisy-gt (GT reference with corrupted labels) or caption."),
    dataset: str = typer.Option(..., "--dataset", help=f"Evaluation data: {_EVAL_DATASETS}."),
    root: RootOpt = None,
    images: ImagesOpt = None,
    masks: MasksOpt = None,
    classes_file: ClassesFileOpt = None,
    limit: LimitOpt = None,
    stride: StrideOpt = 1,
    short_side: ShortSideOpt = None,
    mode: ModeOpt = None,
    reference: Optional[Path] = typer.Option(None, help="noisy-gt: the GT-mode reference set."),
    noise: float = typer.Option(0.3, help="noisy-gt: fraction of labels replaced at random."),
    seed: int = typer.Option(0, help="noisy-gt: corruption seed."),
    photos: Optional[Path] = typer.Option(None, help="caption: reference photos."),
    captions: Optional[Path] = typer.Option(None, help="caption: JSON-lines caption file."),
    pairing_encoder: Optional[str] = typer.Option(None, help="caption: CLIP spec for pairing (step 4)."),
    visual_encoder: str = typer.Option("classical", help="caption: visual encoder spec."),
    text_encoder: str = typer.Option("minilm", help="caption: text encoder spec."),
    photo_limit: Optional[int] = typer.Option(None, help="caption: use the first N photos."),
    out: Optional[Path] = typer.Option(None, help="Output folder: ablation.json, ablation.md."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: CUDA if available)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Build reference-set variants with stages switched off/on, evaluate each, print one table."""
    setup_logging(quiet, verbose)
    from reme.errors import MissingWeightsError, ReferenceSetError
    from reme.eval.commands import run_ablate

    try:
        text = run_ablate(kind=kind, dataset=dataset, out=out, root=root, images=images, masks=masks,
                          classes_file=classes_file, limit=limit, stride=stride,
                          protocol_kw=_eval_protocol_kw(short_side, mode, None, None, None, None, None, False),
                          reference=reference, noise=noise, seed=seed, photos=photos, captions=captions,
                          pairing_encoder=pairing_encoder, visual_encoder=visual_encoder, text_encoder=text_encoder,
                          photo_limit=photo_limit, device=device, progress=not quiet)
    except (MissingWeightsError, ReferenceSetError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(text)
