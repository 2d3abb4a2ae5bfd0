"""Command-line interface: ``reme build-reference``, ``reme segment``, ``reme add-examples``,
``reme info``, ``reme inspect``, ``reme demo``, ``reme eval``, ``reme ablate``.

Thin wrappers over the Python API; flags mirror the keyword names.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from reme.classes import CLASS_LIST_GRAMMAR

#: Help of every --classes / --classes-file option: the one class-list grammar (reme.classes).
_CLASSES_HELP = f"Class list: {CLASS_LIST_GRAMMAR}. Example: 'person; people, car, dog'."
_CLASSES_FILE_HELP = f"Class file, line k = mask value k. Class list: {CLASS_LIST_GRAMMAR}."

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Training-free open-vocabulary semantic segmentation by retrieval (ReME).")
logger = logging.getLogger("reme")


_QUIET_HELP = "Warnings and errors only: no progress bars."
_VERBOSE_HELP = "Also print INFO logs and the model-loading progress bars."


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    """Log warnings (and show reme's progress bars) by default; ``-v`` adds INFO logs and the
    Hugging Face "Loading weights" bars, ``-q`` drops the progress bars."""
    logging.basicConfig(level=logging.INFO if verbose and not quiet else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose and not quiet:
        return
    # transformers reads this switch when imported; huggingface_hub.utils alone is light.
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()
    if "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(code=2)


@app.command("build-reference", short_help="Build a reference set from photos (METHOD.md Part 1).")
def build_reference_cmd(
    images: Path = typer.Option(..., "--images", help="Folder of photos (searched recursively)."),
    out: Path = typer.Option(..., "--out", help="Output reference folder."),
    annotations: Optional[Path] = typer.Option(None, help="GT mode: COCO instances JSON."),
    masks: Optional[Path] = typer.Option(None, help="GT mode: folder of index-PNG masks (same stems as images)."),
    yolo_labels: Optional[Path] = typer.Option(None, help="GT mode: folder of YOLO label files (same stems as images; "
                                               "polygons or boxes, class k = line k of --classes-file)."),
    classes_file: Optional[Path] = typer.Option(None, help="GT mode with --masks or --yolo-labels: " + _CLASSES_FILE_HELP
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
    workers: int = typer.Option(1, help="Worker processes (local engine) or Ray actors for the per-image stages."),
    batch_size: int = typer.Option(8, help="Images per encoder / captioner / spaCy batch."),
    shard_size: int = typer.Option(32, help="Images per shard (the unit of resumption)."),
    engine: str = typer.Option("local", help="'local' (this machine) or 'ray' (Ray Data; pip install \"reme[ray]\")."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address for --engine ray (default: local Ray)."),
    work_dir: Optional[Path] = typer.Option(None, help="Folder for shards (default: OUT.work, removed after success)."),
    resume: bool = typer.Option(True, help="Reuse finished shards of an interrupted run with the same settings."),
    keep_work_dir: bool = typer.Option(False, help="Keep the shards after a successful build."),
    max_image_pixels: int = typer.Option(4096 * 4096, help="Larger images are downscaled (caption) or skipped (GT); 0 = no limit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
):
    """Build a reference set {S_ref, O_ref, L_ref} from photos (METHOD.md Part 1)."""
    _setup_logging(quiet, verbose)
    from reme.annotations import CocoInstances, MaskFolder
    from reme.classes import read_class_file
    from reme.build import CaptionBuildParams, build_caption_reference, build_gt_reference
    from reme.encoders import resolve_encoder
    from reme.errors import MissingWeightsError
    from reme.proposals import FelzenszwalbParams

    if out.exists() and not overwrite:
        _fail(f"{out} exists; pass --overwrite to replace it")
    _check_out_path(out, folder_itself=False)
    if annotations and masks:
        _fail("give either --annotations or --masks, not both")
    if yolo_labels and (annotations or masks):
        _fail("give only one of --annotations, --masks and --yolo-labels")
    if yolo_labels and not classes_file:
        _fail("--yolo-labels needs --classes-file")
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
        if gt_mode:
            if masks and not classes_file:
                _fail("--masks needs --classes-file")
            if yolo_labels:
                from reme.annotations import YoloLabels

                ann = YoloLabels(yolo_labels, [c[0] for c in read_class_file(classes_file)])
            else:
                ann = CocoInstances(annotations) if annotations else MaskFolder(masks, [c[0] for c in read_class_file(classes_file)])
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
        _fail(str(exc))
    typer.echo(json.dumps({"reference": str(out), **ref.manifest["counts"]}))


@app.command("segment", short_help="Segment images into the given classes.")
def segment_cmd(
    images: List[str] = typer.Argument(..., help="Image files, or skimage:NAME for a bundled photo (astronaut, coffee, chelsea, rocket, motorcycle)."),
    classes: Optional[str] = typer.Option(None, help=_CLASSES_HELP),
    classes_file: Optional[Path] = typer.Option(None, help=f"Class file. Class list: {CLASS_LIST_GRAMMAR}."),
    reference: Optional[Path] = typer.Option(None, help="Reference folder (default: the embedded one)."),
    out: Path = typer.Option(Path("reme_out"), help="Output folder."),
    segment_logit_scale: Optional[float] = typer.Option(None, help="tau1 of eq. 1 (default 50)."),
    label_logit_scale: Optional[float] = typer.Option(None, help="tau2 of eq. 2 (default 50)."),
    top_k: Optional[int] = typer.Option(None, help="Softmax over the top-k reference segments (default 10; 0 = all)."),
    paper_form: bool = typer.Option(False, help="Literal paper eqs. 1-3: scales 1, softmax over all segments."),
    retrieval: str = typer.Option("exact", help="Eq. 1 search: 'exact' (stream all of S_ref) or 'topk' "
                                  "(the FAISS index's top-k neighbours, re-scored exactly; faster on large sets)."),
    proposals: Optional[str] = typer.Option(None, help="Proposals (default: the reference set's, else felzenszwalb): "
                                  "felzenszwalb, cluster (Split Matching k-means), "
                                  "sam or sam:MODEL (SAM automatic masks; hub id or local folder)."),
    n_clusters: Optional[int] = typer.Option(None, help="k of --proposals cluster (default: the reference set's, else 8)."),
    smooth_omega: float = typer.Option(0.0, help="GFA smoothing of P_seg over adjacent segments, in [0, 1); 0 = off."),
    others_threshold: Optional[float] = typer.Option(None, help="Label segments whose normalised confidence is "
                                                     "below this 'others' (extra class); default off."),
    allow_encoder_mismatch: bool = typer.Option(False, help="Accept encoders whose spec differs from the manifest."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: CUDA if available)."),
    explain: bool = typer.Option(False, help="Also write <stem>_evidence.json and <stem>_contact_sheet.png: "
                                 "the reference segments behind each test segment's label."),
    explain_segments: int = typer.Option(8, help="With --explain: largest test segments on the contact sheet."),
    image_root: List[Path] = typer.Option([], help="With --explain: folder of the reference set's source photos "
                                          "(repeatable; default: the manifest's image root)."),
    max_working_pixels: int = typer.Option(2048 * 1024, help="Segment larger photos at this many pixels and bring "
                                           "the labels back to full size (bounds memory); 0 = full resolution."),
    overlay_dir: Optional[Path] = typer.Option(None, "--overlay", help="Also search the examples of this overlay "
                                               "folder ('reme add-examples'); it must exist."),
    segment_ids: bool = typer.Option(False, "--segment-ids", help="Also write <stem>_segments.png: the proposal id of "
                                     "each pixel (16-bit PNG), the SEGMENT_IDS of 'reme add-examples --from-segment'."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
):
    """Segment images: writes <stem>_labels.png, <stem>_overlay.png and <stem>_scores.json
    (and <stem>_segments.png with --segment-ids or --explain)."""
    _setup_logging(quiet, verbose)

    from reme import segmenter as sm
    from reme.classes import parse_classes, read_class_file
    from reme.defaults import default_reference_path
    from reme.errors import ImageReadError, MissingWeightsError, ReferenceSetError
    from reme.io import atomic_path, load_image
    from reme.viz import MAX_LABEL_PNG_CLASSES, overlay, save_label_png

    if (classes is None) == (classes_file is None):
        _fail("give exactly one of --classes or --classes-file")
    for flag, value in (("--segment-logit-scale", segment_logit_scale), ("--label-logit-scale", label_logit_scale)):
        if value is not None:
            try:
                sm.check_logit_scale(value, flag)
            except ValueError as exc:
                _fail(str(exc))
    if max_working_pixels < 0:
        _fail(f"--max-working-pixels must be >= 0 (0 = full resolution), got {max_working_pixels}")
    try:
        class_list = classes if classes is not None else read_class_file(classes_file)
        try:
            n_classes = len(parse_classes(class_list)[0]) + (others_threshold is not None)
        except ValueError as exc:
            raise ValueError(f"--classes: {exc}" if classes is not None else f"{classes_file}: {exc}") from None
        if n_classes > MAX_LABEL_PNG_CLASSES:
            raise ValueError(f"{n_classes} classes; a label PNG holds at most {MAX_LABEL_PNG_CLASSES}")
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    _check_out_path(out, folder_itself=True)
    stems = _unique_stems(images)
    try:
        ref = reference or default_reference_path()
        kw = dict(segment_logit_scale=1.0, label_logit_scale=1.0, top_k=None) if paper_form else {}
        if segment_logit_scale is not None:
            kw["segment_logit_scale"] = segment_logit_scale
        if label_logit_scale is not None:
            kw["label_logit_scale"] = label_logit_scale
        if top_k is not None:
            kw["top_k"] = top_k or None
        if overlay_dir is not None:
            kw["overlay"] = _existing_overlay(overlay_dir)
        seg = sm.Segmenter(ref, device=device, allow_encoder_mismatch=allow_encoder_mismatch, retrieval=retrieval,
                           proposals=proposals, n_clusters=n_clusters, smooth_omega=smooth_omega,
                           others_threshold=others_threshold, max_working_pixels=max_working_pixels or None, **kw)
    except (MissingWeightsError, ReferenceSetError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    failed = 0
    for path, stem in zip(images, stems):
        try:
            res = seg.predict(path, class_list, return_evidence=explain)  # read at the working size
            img = load_image(path)                                        # full size, for the overlay
        except ImageReadError as exc:
            typer.secho(f"skipping {path}: {exc}", fg="yellow", err=True)
            failed += 1
            continue
        except ValueError as exc:
            _fail(str(exc))
        save_label_png(res.label_map, out / f"{stem}_labels.png", n_classes=len(res.classes))
        with atomic_path(out / f"{stem}_overlay.png", ".png") as tmp:
            overlay(img, res.label_map, res.classes, fractions=res.class_fractions).save(tmp, format="PNG")
        scores = {
            "image": path, "height": int(img.shape[0]), "width": int(img.shape[1]),
            "working_size": list(res.extras["working_size"]),
            "classes": res.classes,
            "pixel_fraction": {c: round(float(f), 6) for c, f in zip(res.classes, res.class_fractions)},
            "max_segment_score": {c: round(float(s), 6) for c, s in zip(res.classes, res.segment_probs.max(0))},
            "num_segments": int(res.segment_probs.shape[0]),
            "reference": str(ref),
        }
        if overlay_dir is not None:
            scores["overlay"] = {"path": str(overlay_dir), "rows": seg.overlay.num_rows,
                                 "examples": len(seg.overlay.examples())}
        if segment_ids and not explain:
            _write_segment_ids(res.segment_ids, out / f"{stem}_segments.png")
        with atomic_path(out / f"{stem}_scores.json", ".json") as tmp:
            tmp.write_text(json.dumps(scores, indent=2))
        if explain:
            _write_explanation(img, res, seg.reference, str(ref), out, stem, path, explain_segments, image_root)
        top = sorted(zip(res.classes, res.class_fractions), key=lambda x: -x[1])[:5]
        typer.echo(f"{path}: " + ", ".join(f"{c} {100 * f:.1f}%" for c, f in top if f > 0)
                   + ("" if stem == _image_stem(path) else f" (written as {stem}_*)"))
    if failed == len(images):
        raise typer.Exit(code=1)


def _existing_overlay(overlay: Path) -> str:
    """``--overlay`` of ``segment`` / ``eval``: it must exist (the user asked for it); an empty
    overlay is not made up silently."""
    if not (overlay / "manifest.json").is_file():
        _fail(f"--overlay {overlay}: no overlay there (make one with 'reme add-examples --overlay {overlay} ...')")
    return str(overlay)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _gt_annotations(images: Path, masks: Optional[Path], annotations: Optional[Path], yolo_labels: Optional[Path],
                    classes_file: Optional[Path]):
    """``(annotations, keys)`` of GT examples, read as ``reme build-reference`` GT mode reads them;
    keys are image paths relative to ``images`` (POSIX), sorted."""
    from reme.annotations import CocoInstances, MaskFolder, YoloLabels
    from reme.classes import read_class_file
    from reme.io import list_images

    given = [f for f, v in (("--masks", masks), ("--annotations", annotations), ("--yolo-labels", yolo_labels)) if v]
    if len(given) != 1:
        _fail("--images needs exactly one of --masks, --annotations and --yolo-labels"
              + (f" (got {', '.join(given)})" if given else ""))
    if (masks or yolo_labels) and not classes_file:
        _fail(f"{given[0]} needs --classes-file")
    if not images.is_dir():
        _fail(f"--images {images}: not a folder")
    try:
        if annotations:
            ann = CocoInstances(annotations)
            keys = [k for k in ann.keys() if (images / k).is_file()]
        else:
            names = [c[0] for c in read_class_file(classes_file)]
            ann = MaskFolder(masks, names) if masks else YoloLabels(yolo_labels, names)
            keys = [p.relative_to(images).as_posix() for p in list_images(images)]
    except (FileNotFoundError, ValueError, OSError) as exc:
        _fail(str(exc))
    if not keys:
        _fail(f"--images {images}: no images" + (f" named in {annotations}" if annotations else "") + " there")
    return ann, keys


def _example_label_map(ann, key: str, shape, exclude: set):
    """(H, W) int32 GT label map of one image (-1 unlabelled; excluded labels -1 too).

    Raises:
        ValueError: a mask of another size, or (index masks) a value with no line in the class
            file; FileNotFoundError: no mask for the image.
    """
    import numpy as np
    from PIL import Image

    from reme.annotations import MaskFolder

    lm = ann.label_map(key, shape)
    if isinstance(ann, MaskFolder):  # MaskFolder reads unknown values as unlabelled; here they are an error
        raw = np.array(Image.open(ann.mask_path(key)))
        bad = np.unique(raw[(raw != ann.ignore_index) & (raw >= len(ann.label_names))])
        if bad.size:
            raise ValueError(f"mask {ann.mask_path(key)} has value(s) {bad.tolist()[:5]} with no line in the class file "
                             f"({len(ann.label_names)} classes, ignore value {ann.ignore_index})")
    for i, name in enumerate(ann.label_names):
        if name in exclude:
            lm[lm == i] = -1
    return lm


@app.command("add-examples", short_help="Teach by example: add labelled segments to an overlay.")
def add_examples_cmd(
    overlay: Path = typer.Option(..., "--overlay", help="Overlay folder: created when missing, added to otherwise. "
                                 "Beside the reference folder, never inside it."),
    reference: Optional[Path] = typer.Option(None, help="Base reference folder (default: the embedded one)."),
    images: Optional[Path] = typer.Option(None, "--images", help="GT examples: folder of photos (searched recursively); "
                                          "with one of --masks, --annotations, --yolo-labels, as build-reference's GT mode."),
    masks: Optional[Path] = typer.Option(None, help="Folder of index-PNG masks (same stems as the images)."),
    annotations: Optional[Path] = typer.Option(None, help="COCO instances JSON."),
    yolo_labels: Optional[Path] = typer.Option(None, help="Folder of YOLO label files (same stems as the images)."),
    classes_file: Optional[Path] = typer.Option(None, help="With --masks or --yolo-labels: " + _CLASSES_FILE_HELP
                                                + " The first name is the label."),
    exclude_label: List[str] = typer.Option([], help="Label names to leave out (repeatable), e.g. void."),
    min_purity: float = typer.Option(0.5, help="A proposal is added when its majority label covers this fraction "
                                     "of it (GT mode's rule), in (0, 1]."),
    save_every: int = typer.Option(10, help="With --images: also save the overlay after every N images added "
                                   "(a re-run skips the images already in the overlay); 0 = only at the end."),
    from_segment: Optional[Tuple[str, str, str]] = typer.Option(
        None, "--from-segment", metavar="IMG SEGMENT_IDS LABEL",
        help="One example: segment(s) of 'reme segment IMG --segment-ids' (the value of IMG's <stem>_segments.png "
             "at a pixel; several ids comma-separated) labelled LABEL. Use the same --reference, --proposals, "
             "--n-clusters and --max-working-pixels as that 'reme segment' run, so the ids are the same."),
    undo: Optional[str] = typer.Option(None, "--undo", metavar="EXAMPLE_ID|last|all",
                                       help="Remove one example (its id from --list), the last one, or all."),
    list_examples: bool = typer.Option(False, "--list", help="Print the overlay's examples, one JSON object a line."),
    proposals: Optional[str] = typer.Option(None, help="Proposals (default: the reference set's); as 'reme segment'."),
    n_clusters: Optional[int] = typer.Option(None, help="k of --proposals cluster; as 'reme segment'."),
    max_working_pixels: int = typer.Option(2048 * 1024, help="As 'reme segment': larger photos are segmented at this "
                                           "many pixels; 0 = full resolution."),
    allow_encoder_mismatch: bool = typer.Option(False, help="Accept encoders whose spec differs from the manifest."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: CUDA if available)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
):
    """Teach reme by example, with no training: add labelled segments to an overlay folder that
    'reme segment --overlay DIR' searches together with the reference set (reme.overlay).

    One of: --images with GT masks / COCO / YOLO labels (the pieces GT mode would add, per
    image; resumable), --from-segment IMG SEGMENT_IDS LABEL (one segment of 'reme segment'),
    --undo, --list.
    """
    _setup_logging(quiet, verbose)
    from reme.defaults import default_reference_path
    from reme.errors import ImageReadError, MissingWeightsError, ReferenceSetError
    from reme.overlay import check_overlay_path, load_overlay

    modes = [f for f, v in (("--images", images), ("--from-segment", from_segment), ("--undo", undo),
                            ("--list", list_examples)) if v]
    if len(modes) != 1:
        _fail("give exactly one of --images, --from-segment, --undo and --list" + (f" (got {', '.join(modes)})" if modes else ""))
    ref = reference or default_reference_path()
    try:
        check_overlay_path(overlay, ref)
    except ValueError as exc:
        _fail(str(exc))
    if overlay.exists() and not overlay.is_dir():
        _fail(f"--overlay {overlay}: exists and is not a folder")
    is_overlay = (overlay / "manifest.json").is_file()
    if overlay.is_dir() and not is_overlay and any(overlay.iterdir()):
        _fail(f"--overlay {overlay}: a folder that is not an overlay (no manifest.json); choose another path")

    if list_examples or undo:
        if not is_overlay:
            _fail(f"--overlay {overlay}: no overlay there yet")
        try:
            ov = load_overlay(overlay)
            if list_examples:
                for rec in ov.examples():
                    typer.echo(json.dumps(rec))
                return
            n = ov.clear() if undo == "all" else ov.remove(None if undo == "last" else undo)
            ov.save(overlay, base_path=ref)
        except KeyError:
            _fail(f"--undo {undo}: no such example in {overlay} (see --list)")
        except (ReferenceSetError, ValueError, OSError) as exc:
            _fail(str(exc))
        typer.echo(json.dumps({"overlay": str(overlay), "removed_rows": n, "examples": len(ov.examples()),
                               "rows": ov.num_rows}))
        return

    if not 0.0 < min_purity <= 1.0:
        _fail(f"--min-purity must lie in (0, 1], got {min_purity}")
    if save_every < 0 or max_working_pixels < 0:
        _fail("--save-every and --max-working-pixels must be >= 0")
    if images:
        ann, keys = _gt_annotations(images, masks, annotations, yolo_labels, classes_file)
    else:
        try:
            ids = [int(s) for s in from_segment[1].split(",") if s.strip()]
        except ValueError:
            ids = []
        if not ids:
            _fail(f"--from-segment: SEGMENT_IDS must be integers, comma-separated, got {from_segment[1]!r}")
    try:
        from reme.segmenter import Segmenter

        seg = Segmenter(ref, device=device, allow_encoder_mismatch=allow_encoder_mismatch, proposals=proposals,
                        n_clusters=n_clusters, max_working_pixels=max_working_pixels or None, overlay=overlay)
    except (MissingWeightsError, ReferenceSetError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    ov, base_labels = seg.overlay, seg.reference.labels
    rows0, labels0 = ov.num_rows, set(ov.new_labels(base_labels))

    def summary(**extra) -> str:
        return json.dumps({"overlay": str(overlay), **extra, "rows_added": ov.num_rows - rows0,
                           "new_labels": [t for t in ov.new_labels(base_labels) if t not in labels0],
                           "rows": ov.num_rows, "examples": len(ov.examples()), "bytes": _folder_bytes(overlay)})

    if from_segment:
        img, _, label = from_segment
        try:
            eid = seg.add_examples(img, ids, label, min_purity=min_purity, image_name=img)
            seg.save_overlay()
        except (ImageReadError, ValueError, OSError) as exc:
            _fail(str(exc))
        typer.echo(summary(example_id=eid))
        return

    import time

    from tqdm.auto import tqdm

    from reme.io import read_image

    done = set(ov.images)
    todo = [k for k in keys if k not in done]
    stats = {"images": len(keys), "images_added": 0, "images_skipped": len(keys) - len(todo),
             "images_without_pieces": 0, "images_unreadable": 0}
    exclude, since_save, t0 = set(exclude_label), 0, time.perf_counter()
    try:
        for key in tqdm(todo, desc="add examples", unit="img", disable=quiet):
            try:
                img, _ = read_image(images / key)
            except ImageReadError as exc:
                typer.secho(f"skipping {key}: {exc}", fg="yellow", err=True)
                stats["images_unreadable"] += 1
                continue
            try:
                lm = _example_label_map(ann, key, img.shape[:2], exclude)
                eid = seg.add_examples(img, lm, ann.label_names, min_purity=min_purity, image_name=key)
            except (FileNotFoundError, ValueError) as exc:
                if ov.num_rows != rows0:
                    seg.save_overlay()
                _fail(f"{key}: {exc}" + (" (the examples added before it are saved; a re-run continues)"
                                         if ov.num_rows != rows0 else ""))
            if not eid:
                stats["images_without_pieces"] += 1
                continue
            stats["images_added"] += 1
            since_save += 1
            if save_every and since_save >= save_every:
                seg.save_overlay()
                since_save = 0
    except KeyboardInterrupt:
        if ov.num_rows != rows0:
            seg.save_overlay()
        typer.secho(f"interrupted; {stats['images_added']} images saved to {overlay}; a re-run continues",
                    fg="yellow", err=True)
        raise typer.Exit(code=130)
    seconds = time.perf_counter() - t0
    if since_save or not (overlay / "manifest.json").is_file():
        try:
            seg.save_overlay()
        except (ValueError, OSError) as exc:
            _fail(str(exc))
    typer.echo(summary(**stats, seconds_per_image=round(seconds / max(len(todo), 1), 3)))


@app.command("info", short_help="Print a reference set's manifest.")
def info_cmd(reference: Optional[Path] = typer.Argument(None, help="Reference folder (default: the embedded one)."),
             full: bool = typer.Option(False, help="Print the whole manifest as JSON.")):
    """Print a reference set's manifest: encoders, counts, parameters."""
    from reme.defaults import default_reference_path
    from reme.errors import ReferenceSetError
    from reme.reference import read_manifest

    try:
        path = reference or default_reference_path()
        man = read_manifest(path)
    except (ReferenceSetError, FileNotFoundError) as exc:
        _fail(str(exc))
    if full:
        typer.echo(json.dumps(man, indent=2, sort_keys=True))
        return
    lines = [f"reference set: {path}", f"mode: {man.get('mode')}", f"reme version: {man.get('reme_version')}",
             f"created: {man.get('created')}"]
    for k, v in man.get("encoders", {}).items():
        lines.append(f"{k} encoder: {v}")
    lines += [f"segments (S_ref): {man['num_segments']} x {man['visual_dim']} {man.get('embedding_dtype')}",
              f"labels (L_ref): {man['num_labels']} x {man['text_dim']}", f"pairs (O_ref nonzeros): {man['num_pairs']}",
              f"felzenszwalb: {man.get('felzenszwalb')}"]
    for k, v in man.get("counts", {}).items():
        lines.append(f"  {k}: {v}")
    typer.echo("\n".join(lines))


def _write_segment_ids(segment_ids, path: Path) -> None:
    """The (H, W) proposal id of each pixel as a 16-bit PNG (ids above 65535 cannot be written)."""
    import numpy as np
    from PIL import Image

    from reme.io import atomic_path

    if segment_ids.max(initial=0) > np.iinfo(np.uint16).max:
        _fail(f"{path}: {int(segment_ids.max()) + 1} segments do not fit a 16-bit PNG")
    with atomic_path(path, ".png") as tmp:
        Image.fromarray(segment_ids.astype(np.uint16)).save(tmp, format="PNG")


def _write_explanation(img, res, reference, ref_path: str, out: Path, stem: str, path: str, n_segments: int,
                       image_root) -> None:
    """``segment --explain``: evidence JSON (every test segment) and a contact sheet PNG."""
    import numpy as np

    from reme.contact_sheet import contact_sheet, largest_segments, save_contact_sheet
    from reme.crops import ReferenceImages
    from reme.io import atomic_path

    ev = res.evidence
    records = ev.records(reference)
    area = np.bincount(res.segment_ids.ravel(), minlength=len(records))
    for rec in records:
        s = rec["segment"]
        rec["area"] = int(area[s])
        rec["class"] = res.classes[int(np.argmax(res.segment_probs[s]))]
        rec["class_scores"] = {c: round(float(p), 6) for c, p in zip(res.classes, res.segment_probs[s])}
    doc = {"image": path, "classes": res.classes, "segment_ids": f"{stem}_segments.png",
           "logit_scale": ev.logit_scale, "top_k": ev.support, "reference": ref_path}
    with atomic_path(out / f"{stem}_evidence.json", ".json") as tmp:  # one test segment per line
        tmp.write_text(json.dumps(doc)[:-1] + ', "segments": [\n' + ",\n".join(json.dumps(r) for r in records) + "\n]}\n")
    _write_segment_ids(res.segment_ids, out / f"{stem}_segments.png")
    images = ReferenceImages.for_reference(reference, image_root)
    if not images.readable:
        typer.secho("note: the reference set's source photos are not readable here; the contact sheet shows "
                    "placeholders (pass --image-root DIR)", fg="yellow", err=True)
    sheet = contact_sheet(img, res.segment_ids, ev, reference, segments=largest_segments(res.segment_ids, n_segments),
                          images=images, classes=res.classes, segment_probs=res.segment_probs)
    save_contact_sheet(sheet, out / f"{stem}_contact_sheet.png")


@app.command("inspect", short_help="Write an HTML report on a reference set.")
def inspect_cmd(
    reference: Optional[Path] = typer.Argument(None, help="Reference folder (default: the embedded one)."),
    out: Path = typer.Option(Path("reme_inspect"), help="Report folder (replaced if it holds an earlier report)."),
    image_root: List[Path] = typer.Option([], help="Folder of the source photos (repeatable; default: the manifest's)."),
    max_groups: int = typer.Option(24, help="Largest root-noun groups that get a thumbnail sheet."),
    thumbs: int = typer.Option(8, help="Thumbnails per row in a group sheet."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
):
    """Write a report on a reference set: counts per stage, group sizes with the knee, synonym pairs,
    kept and dropped segments per group (OUT/index.html)."""
    _setup_logging(quiet, verbose)
    from reme.defaults import default_reference_path
    from reme.errors import ReferenceSetError
    from reme.inspect_report import inspect_reference
    from reme.reference import load_reference

    try:
        path = reference or default_reference_path()
        ref = load_reference(path)
        report = inspect_reference(ref, out, image_roots=image_root, max_groups=max_groups, thumbs=thumbs,
                                   reference_path=path)
    except (ReferenceSetError, FileNotFoundError, FileExistsError, ValueError) as exc:
        _fail(str(exc))
    summary = json.loads((report / "summary.json").read_text())
    typer.echo(f"wrote {report / 'index.html'}: {summary['num_segments']} segments, {summary['num_groups']} groups, "
               f"knee at rank {summary['knee_rank']}, {len(summary['synonym_pairs'])} synonym pairs, "
               f"{sum(summary['dropped_by_reason'].values())} dropped pairs"
               + ("" if summary["images_readable"] else " (source photos not readable: placeholder thumbnails)"))


@app.command("demo", short_help='Start the demo web page (pip install "reme[demo]").')
def demo_cmd(
    reference: List[str] = typer.Option([], metavar="[NAME=]DIR", help="Reference set as PATH or NAME=PATH (repeatable; the first is "
                                        "the default; default: the embedded one)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(7860, help="TCP port."),
    allowed_host: List[str] = typer.Option([], metavar="NAME", help="Host name the page may be opened "
                                           "under (repeatable; default: the names of --host, e.g. "
                                           "127.0.0.1 and localhost). Other Host headers get 400."),
    image_root: List[Path] = typer.Option([], help="Folder of the reference sets' source photos (repeatable)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: CUDA if available)."),
    overlay: Optional[Path] = typer.Option(None, metavar="DIR", help="Overlay folder every visitor's "
                                           "'Label this as' examples go to, saved after each add/undo "
                                           "(one --reference only; default: each browser session "
                                           "teaches its own in-memory overlay)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
):
    """Start the demo page: upload a photo, type classes, click a segment to see its evidence
    and teach it by example (needs: pip install "reme[demo]")."""
    _setup_logging(quiet, verbose)
    from reme.defaults import default_reference_path
    from reme.errors import MissingWeightsError, ReferenceSetError

    refs: dict = {}
    try:
        for item in reference or [str(default_reference_path())]:
            name, sep, p = item.partition("=")
            if not sep:
                name, p = (Path(item).name if reference else "default"), item
            if not (Path(p) / "manifest.json").is_file():
                raise FileNotFoundError(f"{p} is not a reference set (no manifest.json)")
            refs[name] = Path(p)
        from reme.demo import serve
        from reme.demo.app import require_demo_extra

        require_demo_extra()
        typer.echo(f"reme demo: loading the reference set, then serving http://{host}:{port}/ (Ctrl+C stops it)")
        serve(refs, host=host, port=port, image_roots=image_root, device=device,
              allowed_hosts=allowed_host or None, overlay=overlay)
    except (ImportError, ValueError) as exc:
        _fail(str(exc))
    except (ReferenceSetError, MissingWeightsError, FileNotFoundError) as exc:
        _fail(str(exc))


_EVAL_DATASETS = "voc21, voc20, pc60, pc59, pc459, coco_object, coco_stuff171, cityscapes, ade150, ade847 or generic"


def _eval_protocol_kw(short_side, mode, crop, window_stride, background_mode, bg_threshold, others_threshold,
                      no_synonyms) -> dict:
    return dict(short_side=short_side, mode=mode, crop=crop, window_stride=window_stride, background=background_mode,
                bg_threshold=bg_threshold, others_threshold=others_threshold, synonyms=not no_synonyms)


def _segmenter_kw(top_k, segment_logit_scale, label_logit_scale, **options) -> dict:
    """Segmenter keywords the user set (None = the Segmenter's default)."""
    kw: dict = {k: v for k, v in options.items() if v is not None}
    if top_k is not None:
        kw["top_k"] = top_k or None
    if segment_logit_scale is not None:
        kw["segment_logit_scale"] = segment_logit_scale
    if label_logit_scale is not None:
        kw["label_logit_scale"] = label_logit_scale
    return kw


@app.command("eval", short_help="Evaluate on a benchmark: mIoU, per-class IoU.")
def eval_cmd(
    dataset: str = typer.Option(..., "--dataset", help=f"Benchmark: {_EVAL_DATASETS}."),
    root: Optional[Path] = typer.Option(None, help="Dataset root (folder trees: docs/evaluation.md)."),
    reference: Optional[Path] = typer.Option(None, help="Reference folder (default: the embedded one)."),
    out: Optional[Path] = typer.Option(None, help="Output folder: results.json, results.md, confusion.png, vis/."),
    split: Optional[str] = typer.Option(None, help="Benchmark split (default val / validation)."),
    images: Optional[Path] = typer.Option(None, help="Image folder (generic; overrides a benchmark's layout)."),
    masks: Optional[Path] = typer.Option(None, help="Index-mask folder, same stems (generic; overrides the layout)."),
    classes_file: Optional[Path] = typer.Option(None, help="Generic datasets: " + _CLASSES_FILE_HELP),
    ignore_index: Optional[int] = typer.Option(None, help="Mask value to ignore (generic default 255)."),
    reduce_zero_label: bool = typer.Option(False, help="Generic: ignore mask value 0 and shift the others down."),
    background: Optional[str] = typer.Option(None, help="Generic: name of the background class (set by threshold)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate the first N images (after --offset and --stride)."),
    stride: int = typer.Option(1, help="Use every N-th image."),
    offset: int = typer.Option(0, help="Skip the first N images (sorted by name)."),
    short_side: Optional[int] = typer.Option(None, help="Short side in pixels (default: the benchmark's; 0 = native)."),
    mode: Optional[str] = typer.Option(None, help="Inference: whole (default) or slide."),
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
    top_k: Optional[int] = typer.Option(None, help="Retrieval top-k (default 10; 0 = all)."),
    segment_logit_scale: Optional[float] = typer.Option(None, help="tau1 of eq. 1 (default 50)."),
    label_logit_scale: Optional[float] = typer.Option(None, help="tau2 of eq. 2 (default 50)."),
    retrieval: Optional[str] = typer.Option(None, help="Eq. 1 search: exact (default) or topk (FAISS index)."),
    proposals: Optional[str] = typer.Option(None, help="felzenszwalb, cluster or sam[:MODEL] (default: the reference set's)."),
    n_clusters: Optional[int] = typer.Option(None, help="k of --proposals cluster."),
    smooth_omega: Optional[float] = typer.Option(None, help="GFA smoothing of P_seg over adjacent segments, in [0, 1)."),
    overlay_dir: Optional[Path] = typer.Option(None, "--overlay", help="Also search the examples of this overlay "
                                               "folder ('reme add-examples'); it must exist."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: CUDA if available)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
):
    """Evaluate a reference set on a benchmark: mIoU, per-class IoU, pixel/mean accuracy."""
    _setup_logging(quiet, verbose)
    from reme.defaults import default_reference_path
    from reme.errors import MissingWeightsError, ReferenceSetError
    from reme.eval.commands import run_eval

    try:
        text = run_eval(dataset=dataset, reference=reference or default_reference_path(), out=out, root=root,
                        split=split, images=images, masks=masks, classes_file=classes_file, ignore_index=ignore_index,
                        reduce_zero_label=reduce_zero_label, background_name=background, limit=limit, stride=stride,
                        offset=offset,
                        protocol_kw=_eval_protocol_kw(short_side, mode, crop, window_stride, background_mode,
                                                      bg_threshold, others_threshold, no_synonyms),
                        vis=vis, distractors=distractors, overlap=overlap, bg_sweep=bg_sweep, hold_out=hold_out,
                        others_sweep=others_sweep, segmenter_kw=_segmenter_kw(top_k, segment_logit_scale, label_logit_scale, retrieval=retrieval,
                                                   proposals=proposals, n_clusters=n_clusters,
                                                   smooth_omega=smooth_omega,
                                                   overlay=overlay_dir and _existing_overlay(overlay_dir)),
                        device=device,
                        progress=not quiet)
    except (MissingWeightsError, ReferenceSetError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(text)


@app.command("ablate", short_help="Evaluate reference-set variants, one table.")
def ablate_cmd(
    kind: str = typer.Option("noisy-gt", help="noisy-gt (GT reference with corrupted labels) or caption."),
    dataset: str = typer.Option(..., "--dataset", help=f"Evaluation data: {_EVAL_DATASETS}."),
    root: Optional[Path] = typer.Option(None, help="Dataset root."),
    images: Optional[Path] = typer.Option(None, help="Evaluation image folder (generic)."),
    masks: Optional[Path] = typer.Option(None, help="Evaluation mask folder (generic)."),
    classes_file: Optional[Path] = typer.Option(None, help="Generic evaluation data: " + _CLASSES_FILE_HELP),
    limit: Optional[int] = typer.Option(None, help="Evaluate the first N images (after --stride)."),
    stride: int = typer.Option(1, help="Use every N-th evaluation image."),
    short_side: Optional[int] = typer.Option(None, help="Short side (default: the benchmark's; 0 = native)."),
    mode: Optional[str] = typer.Option(None, help="whole (default) or slide."),
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help=_QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=_VERBOSE_HELP),
):
    """Build reference-set variants with stages switched off/on, evaluate each, print one table."""
    _setup_logging(quiet, verbose)
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
        _fail(str(exc))
    typer.echo(text)


# Help shows a metavar per value type (TEXT, INTEGER, FLOAT, PATH / DIR / FILE) instead of the
# Python type typer would print (<list[Path]>, <str>).
_PATH_METAVARS = {"images": "DIR", "out": "DIR", "reference": "DIR", "masks": "DIR", "image_root": "DIR",
                  "work_dir": "DIR", "root": "DIR", "photos": "DIR", "annotations": "FILE", "classes_file": "FILE",
                  "captions": "FILE", "overlay": "DIR", "overlay_dir": "DIR", "yolo_labels": "DIR"}
_TYPE_METAVARS = {str: "TEXT", int: "INTEGER", float: "FLOAT"}


def _set_metavars(typer_app: typer.Typer) -> None:
    import typing

    for command in typer_app.registered_commands:
        hints = typing.get_type_hints(command.callback)
        for name, param in inspect.signature(command.callback).parameters.items():
            info = param.default
            if not isinstance(info, (typer.models.OptionInfo, typer.models.ArgumentInfo)) or info.metavar:
                continue
            hint = hints[name]
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            base = args[0] if typing.get_origin(hint) in (typing.Union, list) and args else hint
            if base is Path:
                info.metavar = _PATH_METAVARS.get(name, "PATH")
            elif base in _TYPE_METAVARS:
                info.metavar = _TYPE_METAVARS[base]
            if isinstance(info, typer.models.ArgumentInfo) and info.metavar:
                info.metavar = name.upper()


def _argument_type(self, ctx):
    """Arguments with a metavar show just it in help (typer would add ``<list[str]>``)."""
    return None if self.metavar else _typer_argument_type(self, ctx)


_typer_argument_type = typer.core.TyperArgument.display_type_rich
typer.core.TyperArgument.display_type_rich = _argument_type
_set_metavars(app)


def _image_stem(path: str) -> str:
    """Output name stem of an image argument (``skimage:NAME`` -> NAME)."""
    return Path(path.split(":", 1)[1] if path.startswith("skimage:") else path).stem


def _unique_stems(images: List[str]) -> List[str]:
    """One output stem per image argument; images that share a stem (``a/real.jpg``,
    ``b/real.jpg``) get ``real``, ``real-2``, ... in argument order, each said on stderr."""
    taken = {_image_stem(p) for p in images}
    seen: dict = {}
    out = []
    for path in images:
        stem = _image_stem(path)
        if stem in seen:
            n = 2
            while f"{stem}-{n}" in taken:
                n += 1
            new = f"{stem}-{n}"
            taken.add(new)
            typer.secho(f"note: {path} has the same name as {seen[stem]}; its outputs are written as {new}_*",
                        fg="yellow", err=True)
            out.append(new)
        else:
            seen[stem] = path
            out.append(stem)
    return out


def _check_out_path(out: Path, *, folder_itself: bool) -> None:
    """Fail (exit 2, one line naming the path and the cause) before any compute when ``out``
    cannot be written: an existing file, an unwritable folder, a parent that cannot be made.

    ``folder_itself``: create ``out`` and probe it (segment); else probe its parent, since the
    folder is written under a temporary name there (build-reference)."""
    import os
    import tempfile

    if out.exists() and not out.is_dir():
        _fail(f"--out {out}: exists and is not a folder")
    target = out if folder_itself else out.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".reme-write-test.", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = exc.filename if exc.filename and ".reme-write-test." not in str(exc.filename) else target
        _fail(f"--out {out}: cannot write {where} ({exc.strerror or type(exc).__name__})")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
