"""``reme add-examples``: teach by example into an overlay folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from reme.cli._common import (CLASSES_FILE_HELP, PROPOSAL_PIXELS_HELP, QUIET_HELP, VERBOSE_HELP, app, check_options,
                              echo_lines, fail, setup_logging)
from reme.defaults import MAX_WORKING_PIXELS, PROPOSAL_PIXELS
from reme.inference.teach import DEFAULT_SAVE_EVERY

logger = logging.getLogger("reme")


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _gt_annotations(images: Path, masks: Optional[Path], annotations: Optional[Path], yolo_labels: Optional[Path],
                    classes_file: Optional[Path]):
    """``(annotations, keys)`` of GT examples, read as ``reme build-reference`` GT mode reads them;
    keys are image paths relative to ``images`` (POSIX), sorted."""
    from reme.build.annotations import CocoInstances, MaskFolder, YoloLabels
    from reme.classes import read_class_file
    from reme.io import list_images

    given = [f for f, v in (("--masks", masks), ("--annotations", annotations), ("--yolo-labels", yolo_labels)) if v]
    if len(given) != 1:
        fail("--images needs exactly one of --masks, --annotations and --yolo-labels"
              + (f" (got {', '.join(given)})" if given else ""))
    if (masks or yolo_labels) and not classes_file:
        fail(f"{given[0]} needs --classes-file")
    if not images.is_dir():
        fail(f"--images {images}: not a folder")
    try:
        if annotations:
            ann = CocoInstances(annotations)
            keys = [k for k in ann.keys() if (images / k).is_file()]
        else:
            names = [c[0] for c in read_class_file(classes_file, indexed=True)]
            ann = MaskFolder(masks, names) if masks else YoloLabels(yolo_labels, names)
            keys = [p.relative_to(images).as_posix() for p in list_images(images)]
    except (FileNotFoundError, ValueError, OSError) as exc:
        fail(str(exc))
    if not keys:
        fail(f"--images {images}: no images" + (f" named in {annotations}" if annotations else "") + " there")
    return ann, keys


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
    classes_file: Optional[Path] = typer.Option(None, help="With --masks or --yolo-labels: " + CLASSES_FILE_HELP
                                                + " The first name is the label."),
    exclude_label: List[str] = typer.Option([], help="Label names to leave out (repeatable). Names that mean "
                                            "'unlabelled' (void, ignore, unlabelled, ...) are left out already; "
                                            "mask value 255 is unlabelled too."),
    include_label: List[str] = typer.Option([], help="Teach a void-like label anyway (repeatable), e.g. a class "
                                            "really named 'none'."),
    min_purity: float = typer.Option(0.5, help="A proposal is added when its majority label covers this fraction "
                                     "of it (GT mode's rule), in (0, 1]."),
    save_every: int = typer.Option(DEFAULT_SAVE_EVERY, help="With --images: also save the overlay after every N images "
                                   "added (a re-run skips the images already in the overlay); 0 = only at the end."),
    from_segment: Optional[Tuple[str, str, str]] = typer.Option(
        None, "--from-segment", metavar="IMG SEGMENT_IDS LABEL",
        help="One example: segment(s) of 'reme segment IMG --segment-ids' (the value of IMG's <stem>_segments.png "
             "at a pixel; several ids comma-separated) labelled LABEL. Use the same --reference, --proposals, "
             "--n-clusters, --max-working-pixels and --proposal-pixels as that 'reme segment' run, so the ids are "
             "the same."),
    undo: Optional[str] = typer.Option(None, "--undo", metavar="EXAMPLE_ID|last|all",
                                       help="Remove one example (its id from --list), the last one, or all."),
    list_examples: bool = typer.Option(False, "--list", help="Print the overlay's examples, one JSON object a line."),
    proposals: Optional[str] = typer.Option(None, help="Proposals (default: the reference set's); as 'reme segment'."),
    n_clusters: Optional[int] = typer.Option(None, help="k of --proposals cluster; as 'reme segment'."),
    max_working_pixels: int = typer.Option(MAX_WORKING_PIXELS, help="As 'reme segment': larger photos are segmented "
                                           "at this many pixels; 0 = full resolution."),
    proposal_pixels: int = typer.Option(PROPOSAL_PIXELS or 0, help=PROPOSAL_PIXELS_HELP),
    allow_encoder_mismatch: bool = typer.Option(False, help="Accept encoders whose spec differs from the manifest."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: CUDA if available)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Teach reme by example, with no training: add labelled segments to an overlay folder that
    'reme segment --overlay DIR' searches together with the reference set (reme.reference.overlay).

    One of: --images with GT masks / COCO / YOLO labels (the pieces GT mode would add, per
    image; resumable), --from-segment IMG SEGMENT_IDS LABEL (one segment of 'reme segment'),
    --undo, --list.
    """
    setup_logging(quiet, verbose)
    from reme.defaults import default_reference_path
    from reme.errors import ImageReadError, MissingWeightsError, ReferenceSetError
    from reme.reference.overlay import check_overlay_path, load_overlay

    modes = [f for f, v in (("--images", images), ("--from-segment", from_segment), ("--undo", undo),
                            ("--list", list_examples)) if v]
    if len(modes) != 1:
        fail("give exactly one of --images, --from-segment, --undo and --list" + (f" (got {', '.join(modes)})" if modes else ""))
    ref = reference or default_reference_path()
    try:
        check_overlay_path(overlay, ref)
    except ValueError as exc:
        fail(str(exc))
    if overlay.exists() and not overlay.is_dir():
        fail(f"--overlay {overlay}: exists and is not a folder")
    is_overlay = (overlay / "manifest.json").is_file()
    if overlay.is_dir() and not is_overlay and any(overlay.iterdir()):
        fail(f"--overlay {overlay}: a folder that is not an overlay (no manifest.json); choose another path")

    if list_examples or undo:
        if not is_overlay:
            fail(f"--overlay {overlay}: no overlay there yet")
        try:
            ov = load_overlay(overlay)
            if list_examples:
                echo_lines(json.dumps(rec) for rec in ov.examples())
                return
            n = ov.clear() if undo == "all" else ov.remove(None if undo == "last" else undo)
            ov.save(overlay, base_path=ref)
        except KeyError:
            fail(f"--undo {undo}: no such example in {overlay} (see --list)")
        except (ReferenceSetError, ValueError, OSError) as exc:
            fail(str(exc))
        typer.echo(json.dumps({"overlay": str(overlay), "removed_rows": n, "examples": len(ov.examples()),
                               "rows": ov.num_rows}))
        return

    if not 0.0 < min_purity <= 1.0:
        fail(f"--min-purity must lie in (0, 1], got {min_purity}")
    if save_every < 0 or max_working_pixels < 0:
        fail("--save-every and --max-working-pixels must be >= 0")
    check_options(proposals=proposals, n_clusters=n_clusters, proposal_pixels=proposal_pixels)
    if from_segment:
        from reme.classes import check_label

        try:
            check_label(from_segment[2])
        except ValueError as exc:
            fail(f"--from-segment LABEL: {exc}")
    if images:
        ann, keys = _gt_annotations(images, masks, annotations, yolo_labels, classes_file)
    else:
        try:
            ids = [int(s) for s in from_segment[1].split(",") if s.strip()]
        except ValueError:
            ids = []
        if not ids:
            fail(f"--from-segment: SEGMENT_IDS must be integers, comma-separated, got {from_segment[1]!r}")
    try:
        from reme.inference.segmenter import Segmenter

        seg = Segmenter(ref, device=device, allow_encoder_mismatch=allow_encoder_mismatch, proposals=proposals,
                        n_clusters=n_clusters, max_working_pixels=max_working_pixels or None, overlay=overlay,
                        proposal_pixels=proposal_pixels or None)
    except (MissingWeightsError, ReferenceSetError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    ov, base_labels = seg.overlay, seg.reference.labels
    rows0, labels0 = ov.num_rows, set(ov.new_labels(base_labels))

    def summary(**extra) -> str:
        extra.setdefault("rows_added", ov.num_rows - rows0)
        return json.dumps({"overlay": str(overlay), **extra,
                           "new_labels": [t for t in ov.new_labels(base_labels) if t not in labels0],
                           "rows": ov.num_rows, "examples": len(ov.examples()), "bytes": _folder_bytes(overlay)})

    if from_segment:
        img, _, label = from_segment
        try:
            eid = seg.add_examples(img, ids, label, min_purity=min_purity, image_name=img)
            seg.save_overlay()
        except (ImageReadError, ValueError, OSError) as exc:
            fail(str(exc))
        typer.echo(summary(example_id=eid, rows_added=ov.example_ids.count(eid)))
        return

    import warnings

    from reme.inference.teach import TeachInterrupted, teach_from_annotations

    def unreadable(key, exc):
        typer.secho(f"skipping {key}: {exc}", fg="yellow", err=True)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", UserWarning)
            warnings.showwarning = lambda msg, *a, **k: typer.secho(f"warning: {msg}", fg="yellow", err=True)
            stats = teach_from_annotations(seg, images, ann, keys, min_purity=min_purity, save_every=save_every,
                                           exclude=exclude_label, include=include_label, progress=not quiet,
                                           on_unreadable=unreadable)
    except TeachInterrupted as exc:
        typer.secho(f"interrupted; {exc.stats.images_added} images saved to {overlay}; a re-run continues",
                    fg="yellow", err=True)
        raise typer.Exit(code=130)
    except (FileNotFoundError, ValueError, OSError) as exc:
        fail(str(exc))
    typer.echo(summary(**stats.as_dict()))
