"""Command-line interface: ``reme build-reference``, ``reme segment``, ``reme info``.

Thin wrappers over the Python API; flags mirror the keyword names.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Training-free open-vocabulary semantic segmentation by retrieval (ReME).")
logger = logging.getLogger("reme")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(code=2)


@app.command("build-reference")
def build_reference_cmd(
    images: Path = typer.Option(..., "--images", help="Folder of photos (searched recursively)."),
    out: Path = typer.Option(..., "--out", help="Output reference folder."),
    annotations: Optional[Path] = typer.Option(None, help="GT mode: COCO instances JSON."),
    masks: Optional[Path] = typer.Option(None, help="GT mode: folder of index-PNG masks (same stems as images)."),
    classes_file: Optional[Path] = typer.Option(None, help="GT mode with --masks: class names, one per line."),
    gt_segments: str = typer.Option("proposals", help="GT mode: 'proposals' (Felzenszwalb, majority label) or 'masks'."),
    background_label: Optional[str] = typer.Option(None, help="GT mode: label for unannotated pixels."),
    exclude_label: List[str] = typer.Option([], help="GT mode: label names to leave out (repeatable)."),
    captions: Optional[Path] = typer.Option(None, help="Caption mode: JSON-lines caption file (skips captioning)."),
    captioner: str = typer.Option("llava-1.5-7b", help="Caption mode: captioner spec (llava-1.5-7b, blip-base, ...)."),
    pairing_encoder: str = typer.Option("clip-vit-b-16", help="Caption mode: CLIP spec for pairing (step 4)."),
    visual_encoder: str = typer.Option("dinov2-vitl14", help="Visual encoder for S_ref ('classical' works offline)."),
    text_encoder: Optional[str] = typer.Option(None, help="Text encoder for L_ref (default: the pairing CLIP; GT mode: minilm)."),
    felzenszwalb: str = typer.Option("default", help="Felzenszwalb preset: default, voc, coco-stuff, cityscapes."),
    drop_rate: float = typer.Option(0.30, help="delta_filter of the group-median filter (step 7)."),
    adaptive_filter: bool = typer.Option(False, help="Adaptive per-group drop rate in [0, 50%] (step 7 variant)."),
    group_filter: bool = typer.Option(True, help="Run the group-median filter (step 7)."),
    knee_filter: bool = typer.Option(True, help="Run the ambiguous-label knee filter (step 8)."),
    k_sim: int = typer.Option(30, help="Synonym pairs added (step 9); 0 disables."),
    embedding_dtype: str = typer.Option("float16", help="Storage dtype of S_ref: float16 or float32."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: CUDA if available)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings only, no progress bars."),
):
    """Build a reference set {S_ref, O_ref, L_ref} from photos (METHOD.md Part 1)."""
    _setup_logging(quiet)
    from reme.annotations import CocoInstances, MaskFolder, read_class_names
    from reme.build import CaptionBuildParams, build_caption_reference, build_gt_reference
    from reme.encoders import resolve_encoder
    from reme.errors import MissingWeightsError
    from reme.proposals import FelzenszwalbParams

    if out.exists() and not overwrite:
        _fail(f"{out} exists; pass --overwrite to replace it")
    if annotations and masks:
        _fail("give either --annotations or --masks, not both")
    try:
        fz = FelzenszwalbParams.preset(felzenszwalb)
        gt_mode = bool(annotations or masks)
        vis = resolve_encoder(visual_encoder, device=device)
        if gt_mode:
            if masks and not classes_file:
                _fail("--masks needs --classes-file")
            ann = CocoInstances(annotations) if annotations else MaskFolder(masks, read_class_names(classes_file))
            txt = resolve_encoder(text_encoder or "minilm", device=device)
            ref = build_gt_reference(images, ann, vis, txt, segments=gt_segments, felzenszwalb=fz,
                                     background_label=background_label, exclude_labels=exclude_label,
                                     progress=not quiet)
        else:
            cap = resolve_encoder(f"captions:{captions}" if captions else captioner, device=device)
            clip = resolve_encoder(pairing_encoder, device=device)
            txt = resolve_encoder(text_encoder, device=device) if text_encoder else clip
            params = CaptionBuildParams(drop_rate=drop_rate, adaptive_filter=adaptive_filter,
                                        group_filter=group_filter, knee_filter=knee_filter, k_sim=k_sim)
            ref = build_caption_reference(images, cap, clip, vis, txt, params=params, felzenszwalb=fz,
                                          progress=not quiet)
        ref.save(out, overwrite=overwrite, embedding_dtype=embedding_dtype)
    except (MissingWeightsError, FileNotFoundError, ValueError, ImportError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"reference": str(out), **ref.manifest["counts"]}))


@app.command("segment")
def segment_cmd(
    images: List[str] = typer.Argument(..., help="Image files, or skimage:NAME for a bundled photo (astronaut, coffee, chelsea, rocket, motorcycle)."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated class names; ';' joins synonyms."),
    classes_file: Optional[Path] = typer.Option(None, help="Class names, one per line."),
    reference: Optional[Path] = typer.Option(None, help="Reference folder (default: the embedded one)."),
    out: Path = typer.Option(Path("reme_out"), help="Output folder."),
    segment_logit_scale: Optional[float] = typer.Option(None, help="tau1 of eq. 1 (default 50)."),
    label_logit_scale: Optional[float] = typer.Option(None, help="tau2 of eq. 2 (default 50)."),
    top_k: Optional[int] = typer.Option(None, help="Softmax over the top-k reference segments (default 10; 0 = all)."),
    paper_form: bool = typer.Option(False, help="Literal paper eqs. 1-3: scales 1, softmax over all segments."),
    allow_encoder_mismatch: bool = typer.Option(False, help="Accept encoders whose spec differs from the manifest."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: CUDA if available)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Segment images: writes <stem>_labels.png, <stem>_overlay.png and <stem>_scores.json."""
    _setup_logging(quiet)
    import numpy as np

    from reme import segmenter as sm
    from reme.annotations import read_class_names
    from reme.defaults import default_reference_path
    from reme.errors import ImageReadError, MissingWeightsError, ReferenceSetError
    from reme.io import atomic_path, load_image
    from reme.viz import overlay, save_label_png

    if bool(classes) == bool(classes_file):
        _fail("give exactly one of --classes or --classes-file")
    try:
        class_list = classes if classes else read_class_names(classes_file)
        ref = reference or default_reference_path()
        kw = dict(segment_logit_scale=1.0, label_logit_scale=1.0, top_k=None) if paper_form else {}
        if segment_logit_scale is not None:
            kw["segment_logit_scale"] = segment_logit_scale
        if label_logit_scale is not None:
            kw["label_logit_scale"] = label_logit_scale
        if top_k is not None:
            kw["top_k"] = top_k or None
        seg = sm.Segmenter(ref, device=device, allow_encoder_mismatch=allow_encoder_mismatch, **kw)
    except (MissingWeightsError, ReferenceSetError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in images:
        try:
            img = load_image(path)
            res = seg.predict(img, class_list)
        except ImageReadError as exc:
            typer.secho(f"skipping {path}: {exc}", fg="yellow", err=True)
            failed += 1
            continue
        except ValueError as exc:
            _fail(str(exc))
        stem = Path(path.split(":", 1)[1] if path.startswith("skimage:") else path).stem
        save_label_png(res.label_map, out / f"{stem}_labels.png")
        with atomic_path(out / f"{stem}_overlay.png", ".png") as tmp:
            overlay(img, res.label_map, res.classes, fractions=res.class_fractions).save(tmp, format="PNG")
        scores = {
            "image": path, "height": int(img.shape[0]), "width": int(img.shape[1]),
            "classes": res.classes,
            "pixel_fraction": {c: round(float(f), 6) for c, f in zip(res.classes, res.class_fractions)},
            "max_segment_score": {c: round(float(s), 6) for c, s in zip(res.classes, res.segment_probs.max(0))},
            "num_segments": int(res.segment_probs.shape[0]),
            "reference": str(ref),
        }
        with atomic_path(out / f"{stem}_scores.json", ".json") as tmp:
            tmp.write_text(json.dumps(scores, indent=2))
        top = sorted(zip(res.classes, res.class_fractions), key=lambda x: -x[1])[:5]
        typer.echo(f"{path}: " + ", ".join(f"{c} {100 * f:.1f}%" for c, f in top if f > 0))
    if failed == len(images):
        raise typer.Exit(code=1)


@app.command("info")
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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
