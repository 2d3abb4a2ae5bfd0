"""``reme segment``: label maps, overlays, scores, evidence."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer

from reme.checks import MAX_LOGIT_SCALE
from reme.defaults import LOGIT_SCALE, MAX_WORKING_PIXELS, PROPOSAL_PIXELS, TOP_K

from reme.classes import CLASS_LIST_GRAMMAR
from reme.cli._common import (CLASSES_HELP, PROPOSAL_PIXELS_HELP, QUIET_HELP, VERBOSE_HELP, app, check_options,
                              check_out_path, check_reference_manifest, existing_overlay, fail, image_stem, readable_images,
                              setup_logging, unique_stems)

logger = logging.getLogger("reme")


@app.command("segment", short_help="Segment images into the given classes.")
def segment_cmd(
    images: List[str] = typer.Argument(..., help="Image files, folders (all their images, recursively), or "
                                       "skimage:NAME for a bundled photo (astronaut, coffee, chelsea, rocket, motorcycle)."),
    classes: Optional[str] = typer.Option(None, help=CLASSES_HELP),
    classes_file: Optional[Path] = typer.Option(None, help=f"Class file. Class list: {CLASS_LIST_GRAMMAR}."),
    reference: Optional[Path] = typer.Option(None, help="Reference folder (default: the embedded one)."),
    out: Path = typer.Option(Path("reme_out"), help="Output folder."),
    segment_logit_scale: Optional[float] = typer.Option(None, help=f"tau1 of eq. 1 (default {LOGIT_SCALE:g}; at most {MAX_LOGIT_SCALE:g})."),
    label_logit_scale: Optional[float] = typer.Option(None, help=f"tau2 of eq. 2 (default {LOGIT_SCALE:g}; at most {MAX_LOGIT_SCALE:g})."),
    top_k: Optional[int] = typer.Option(None, help=f"Softmax over the top-k reference segments (default {TOP_K}; 0 = all)."),
    paper_form: bool = typer.Option(False, help="Literal paper eqs. 1-3: scales 1, softmax over all segments, "
                                    "every pixel assigned, full-size proposals (implies --no-unlabelled "
                                    "--proposal-pixels 0)."),
    unlabelled: bool = typer.Option(True, "--unlabelled/--no-unlabelled",
                                    help="Leave unlabelled what matches none of the classes (label PNG 255, "
                                    "or 65535 in 16-bit PNGs; docs/method.md 'None of these'). "
                                    "--no-unlabelled assigns every pixel."),
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
    max_working_pixels: int = typer.Option(MAX_WORKING_PIXELS, help="Segment larger photos at this many pixels and bring "
                                           "the labels back to full size (bounds memory); 0 = full resolution."),
    proposal_pixels: int = typer.Option(PROPOSAL_PIXELS or 0, help=PROPOSAL_PIXELS_HELP),
    overlay_dir: Optional[Path] = typer.Option(None, "--overlay", help="Also search the examples of this overlay "
                                               "folder ('reme add-examples'); it must exist."),
    segment_ids: bool = typer.Option(False, "--segment-ids", help="Also write <stem>_segments.png: the proposal id of "
                                     "each pixel (16-bit PNG), the SEGMENT_IDS of 'reme add-examples --from-segment'."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Segment images: writes <stem>_labels.png, <stem>_overlay.png and <stem>_scores.json
    (and <stem>_segments.png with --segment-ids or --explain)."""
    setup_logging(quiet, verbose)
    from reme.classes import parse_classes, read_class_file
    from reme.defaults import default_reference_path

    # everything that needs no model is checked first: a bad value is refused in well under a second
    if (classes is None) == (classes_file is None):
        fail("give exactly one of --classes or --classes-file")
    check_options(top_k=top_k, smooth_omega=smooth_omega, retrieval=retrieval, proposals=proposals,
                  n_clusters=n_clusters, others_threshold=others_threshold, segment_logit_scale=segment_logit_scale,
                  label_logit_scale=label_logit_scale, proposal_pixels=proposal_pixels)
    if max_working_pixels < 0:
        fail(f"--max-working-pixels must be >= 0 (0 = full resolution), got {max_working_pixels}")
    if explain_segments < 1:
        fail(f"--explain-segments must be >= 1, got {explain_segments}")
    try:
        class_list = classes if classes is not None else read_class_file(classes_file)
        try:
            n_classes = len(parse_classes(class_list)[0]) + (others_threshold is not None)
        except ValueError as exc:
            raise ValueError(f"--classes: {exc}" if classes is not None else f"{classes_file}: {exc}") from None
        from reme.report.viz import MAX_LABEL_PNG_CLASSES

        if n_classes > MAX_LABEL_PNG_CLASSES:
            raise ValueError(f"{n_classes} classes; a label PNG holds at most {MAX_LABEL_PNG_CLASSES}")
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    ref = reference or default_reference_path()
    check_reference_manifest(ref)
    images = readable_images(images, max_working_pixels)
    if overlay_dir is not None:
        existing_overlay(overlay_dir)
    check_out_path(out, folder_itself=True)
    stems = unique_stems(images)

    from reme.errors import ImageReadError, MissingWeightsError, ReferenceSetError
    from reme.inference import segmenter as sm
    from reme.io import atomic_path, load_image
    from reme.report.viz import overlay, save_label_png

    try:
        kw = dict(segment_logit_scale=1.0, label_logit_scale=1.0, top_k=None) if paper_form else {}
        if segment_logit_scale is not None:
            kw["segment_logit_scale"] = segment_logit_scale
        if label_logit_scale is not None:
            kw["label_logit_scale"] = label_logit_scale
        if top_k is not None:
            kw["top_k"] = top_k or None
        if overlay_dir is not None:
            kw["overlay"] = str(overlay_dir)
        kw["unlabelled"] = unlabelled and not paper_form
        seg = sm.Segmenter(ref, device=device, allow_encoder_mismatch=allow_encoder_mismatch, retrieval=retrieval,
                           proposals=proposals, n_clusters=n_clusters, smooth_omega=smooth_omega,
                           others_threshold=others_threshold, max_working_pixels=max_working_pixels or None,
                           proposal_pixels=None if paper_form else proposal_pixels or None, **kw)
    except (MissingWeightsError, ReferenceSetError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if seg.none_rule.label_threshold is not None:
        from reme.inference.unlabelled import coverage_warning

        warning = coverage_warning(seg.class_coverage(class_list))
        if warning:
            typer.secho(warning, fg="yellow", err=True)
    from tqdm.auto import tqdm

    failed = 0
    for path, stem in tqdm(list(zip(images, stems)), desc="segment", unit="img", disable=quiet or len(images) < 2):
        try:
            res = seg.predict(path, class_list, return_evidence=explain)  # read at the working size
            img = load_image(path)                                        # full size, for the overlay
        except ImageReadError as exc:
            typer.secho(f"skipping {path}: {exc}", fg="yellow", err=True)
            failed += 1
            continue
        except ValueError as exc:
            fail(str(exc))
        save_label_png(res.label_map, out / f"{stem}_labels.png", n_classes=len(res.classes))
        with atomic_path(out / f"{stem}_overlay.png", ".png") as tmp:
            overlay(img, res.label_map, res.classes, fractions=res.class_fractions,
                    unlabelled_fraction=res.unlabelled_fraction).save(tmp, format="PNG")
        scores = {
            "image": path, "height": int(img.shape[0]), "width": int(img.shape[1]),
            "working_size": list(res.extras["working_size"]),
            "classes": res.classes,
            "pixel_fraction": {c: round(float(f), 6) for c, f in zip(res.classes, res.class_fractions)},
            "max_segment_score": {c: round(float(s), 6) for c, s in zip(res.classes, res.segment_scores.max(0))},
            "num_segments": int(res.segment_scores.shape[0]),
            "reference": str(ref),
        }
        if seg.none_rule.active:  # "none of these" (docs/method.md)
            from reme.report.viz import PNG_UNLABELLED_8, PNG_UNLABELLED_16

            scores["unlabelled_fraction"] = round(float(res.unlabelled_fraction), 6)
            scores["unlabelled_png_value"] = PNG_UNLABELLED_8 if len(res.classes) <= 255 else PNG_UNLABELLED_16
            scores["none_rule"] = {"t_none": seg.none_rule.label_threshold, "s_min": seg.none_rule.min_support}
            if res.coverage is not None:
                scores["coverage"] = [c.as_dict() for c in res.coverage]
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
        unl = f"unlabelled {100 * res.unlabelled_fraction:.1f}%" if res.unlabelled_fraction > 0 else ""
        typer.echo(f"{path}: " + ", ".join([f"{c} {100 * f:.1f}%" for c, f in top if f > 0] + ([unl] if unl else []))
                   + ("" if stem == image_stem(path) else f" (written as {stem}_*)"))
    if failed == len(images):
        raise typer.Exit(code=1)
    if failed:
        typer.secho(f"{failed} of {len(images)} images could not be read", fg="yellow", err=True)


def _write_segment_ids(segment_ids, path: Path) -> None:
    """The (H, W) proposal id of each pixel as a 16-bit PNG (ids above 65535 cannot be written)."""
    import numpy as np
    from PIL import Image

    from reme.io import atomic_path

    if segment_ids.max(initial=0) > np.iinfo(np.uint16).max:
        fail(f"{path}: {int(segment_ids.max()) + 1} segments do not fit a 16-bit PNG")
    with atomic_path(path, ".png") as tmp:
        Image.fromarray(segment_ids.astype(np.uint16)).save(tmp, format="PNG")


def _write_explanation(img, res, reference, ref_path: str, out: Path, stem: str, path: str, n_segments: int,
                       image_root) -> None:
    """``segment --explain``: evidence JSON (every test segment) and a contact sheet PNG."""
    import numpy as np

    from reme.report.contact_sheet import contact_sheet, largest_segments, save_contact_sheet
    from reme.report.crops import ReferenceImages
    from reme.io import atomic_path

    ev = res.evidence
    records = ev.records(reference)
    area = np.bincount(res.segment_ids.ravel(), minlength=len(records))
    for rec in records:
        s = rec["segment"]
        rec["area"] = int(area[s])
        rec["class"] = res.classes[int(np.argmax(res.segment_scores[s]))]
        rec["class_scores"] = {c: round(float(p), 6) for c, p in zip(res.classes, res.segment_scores[s])}
        if "unlabelled_segments" in res.extras:  # "none of these": why a segment stayed unlabelled
            rec["unlabelled"] = bool(res.extras["unlabelled_segments"][s])
            if rec["unlabelled"]:
                rec["class"] = None
            for key in ("none_scores", "nearest_similarity"):
                v = float(res.extras[key][s])
                rec[key[:-1] if key == "none_scores" else key] = None if np.isnan(v) else round(v, 6)
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
                          images=images, classes=res.classes, segment_scores=res.segment_scores)
    save_contact_sheet(sheet, out / f"{stem}_contact_sheet.png")
