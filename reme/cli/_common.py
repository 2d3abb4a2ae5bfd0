"""Shared pieces of the command line: the typer app, logging set-up, one-line errors and
output-path checks (every command module registers on `app`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List

import typer

from reme.classes import CLASS_LIST_GRAMMAR
from reme.cli.threads import apply_threads

#: Help of every --classes / --classes-file option: the one class-list grammar (reme.classes).
CLASSES_HELP = f"Class list: {CLASS_LIST_GRAMMAR}. Example: 'person; people, car, dog'."
CLASSES_FILE_HELP = f"Class file, line k = mask value k. Class list: {CLASS_LIST_GRAMMAR}."

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Training-free open-vocabulary semantic segmentation by retrieval (ReME).")
logger = logging.getLogger("reme")


QUIET_HELP = "Warnings and errors only: no progress bars."
#: ``--proposal-pixels`` of `segment`, `eval` and `add-examples`.
PROPOSAL_PIXELS_HELP = ("Make the Felzenszwalb proposals at about this many pixels (parameters scaled, labels at the "
                        "working size); 0 = at the working size, as a build makes them.")
VERBOSE_HELP = "Also print INFO logs and the model-loading progress bars."


def setup_logging(quiet: bool, verbose: bool = False) -> None:
    """Log warnings (and show reme's progress bars) by default; ``-v`` adds INFO logs and the
    Hugging Face "Loading weights" bars, ``-q`` drops the progress bars. Also applies the
    thread policy (`reme.cli.threads`: ``$REME_THREADS``, else auto)."""
    try:
        apply_threads()
    except ValueError as exc:
        fail(str(exc))
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


def echo_lines(lines) -> None:
    """Print lines to stdout; a reader that stops early (``| head -1``) ends the output quietly
    (exit 0), not with ``Broken pipe``."""
    import os

    try:
        for line in lines:
            typer.echo(line)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        raise typer.Exit(code=0)


def fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(code=2)


def image_stem(path: str) -> str:
    """Output name stem of an image argument (``skimage:NAME`` -> NAME)."""
    return Path(path.split(":", 1)[1] if path.startswith("skimage:") else path).stem


def unique_stems(images: List[str]) -> List[str]:
    """One output stem per image argument; images that share a stem (``a/real.jpg``,
    ``b/real.jpg``) get ``real``, ``real-2``, ... in argument order, each said on stderr."""
    taken = {image_stem(p) for p in images}
    seen: dict = {}
    out = []
    for path in images:
        stem = image_stem(path)
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


def check_out_path(out: Path, *, folder_itself: bool) -> None:
    """Fail (exit 2, one line naming the path and the cause) before any compute when ``out``
    cannot be written: an existing file, an unwritable folder, a parent that cannot be made.

    ``folder_itself``: create ``out`` and probe it (segment); else probe its parent, since the
    folder is written under a temporary name there (build-reference)."""
    import os
    import tempfile

    if out.exists() and not out.is_dir():
        fail(f"--out {out}: exists and is not a folder")
    target = out if folder_itself else out.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".reme-write-test.", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = exc.filename if exc.filename and ".reme-write-test." not in str(exc.filename) else target
        fail(f"--out {out}: cannot write {where} ({exc.strerror or type(exc).__name__})")


def existing_overlay(overlay: Path) -> str:
    """``--overlay`` of ``segment`` / ``eval``: it must exist (the user asked for it); an empty
    overlay is not made up silently."""
    if not (overlay / "manifest.json").is_file():
        fail(f"--overlay {overlay}: no overlay there (make one with 'reme add-examples --overlay {overlay} ...')")
    return str(overlay)


def segmenter_kw(top_k, segment_logit_scale, label_logit_scale, proposal_pixels: int, **options) -> dict:
    """Segmenter keywords the user set (None = the Segmenter's default; ``proposal_pixels`` 0 =
    proposals at the working size), checked before by `check_options`."""
    kw: dict = {k: v for k, v in options.items() if v is not None}
    kw["proposal_pixels"] = proposal_pixels or None
    if top_k is not None:
        kw["top_k"] = top_k or None
    if segment_logit_scale is not None:
        kw["segment_logit_scale"] = segment_logit_scale
    if label_logit_scale is not None:
        kw["label_logit_scale"] = label_logit_scale
    return kw


#: CLI flag of each Segmenter option, for messages of `check_options`.
OPTION_FLAGS = {"top_k": "--top-k", "smooth_omega": "--smooth-omega", "retrieval": "--retrieval",
                "proposals": "--proposals", "n_clusters": "--n-clusters", "others_threshold": "--others-threshold",
                "segment_logit_scale": "--segment-logit-scale", "label_logit_scale": "--label-logit-scale",
                "proposal_pixels": "--proposal-pixels"}


def check_options(**options) -> None:
    """Fail (exit 2, one line naming the flag) on a bad Segmenter option, before any model loads
    ([`reme.checks.check_segment_options`][reme.checks.check_segment_options])."""
    from reme.checks import check_segment_options

    try:
        check_segment_options(**options, names=OPTION_FLAGS)
    except ValueError as exc:
        fail(str(exc))


def check_reference_manifest(ref: Path) -> None:
    """Fail on a missing reference folder or a damaged manifest (types, templates, Felzenszwalb
    values) before any model loads; the files themselves are verified when loaded."""
    from reme.reference import read_manifest

    try:
        read_manifest(ref)
    except ValueError as exc:
        fail(str(exc))


def readable_images(images: List[str], max_working_pixels: int) -> List[str]:
    """The image arguments, folders expanded to their images, each checked from its header
    ([`reme.io.probe_image`][reme.io.probe_image]: missing, not an image, a folder, over the pixel
    limit); unreadable ones are skipped with a note, and the command fails (exit 2) when none is
    left, all before any model loads."""
    from reme.errors import ImageReadError
    from reme.io import expand_image_args, probe_image

    try:
        paths = expand_image_args(images)
    except ImageReadError as exc:
        fail(str(exc))
    good = []
    for p in paths:
        try:
            probe_image(p, max_pixels=max_working_pixels or None)
            good.append(p)
        except ImageReadError as exc:
            if len(paths) == 1:
                fail(str(exc))
            typer.secho(f"skipping {p}: {exc}", fg="yellow", err=True)
    if not good:
        fail(f"none of the {len(paths)} images can be read")
    return good
