"""``reme info``, ``reme inspect``, ``reme demo``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer

from reme.cli._common import (QUIET_HELP, VERBOSE_HELP, app, fail, setup_logging)

logger = logging.getLogger("reme")


@app.command("info", short_help="Print a reference set's manifest.")
def info_cmd(reference: Optional[Path] = typer.Argument(None, help="Reference folder (default: the embedded one)."),
             full: bool = typer.Option(False, help="Print the whole manifest as JSON."),
             labels: bool = typer.Option(False, "--labels", help="List the labels with their segment counts, "
                                         "most segments first (the words the reference set knows).")):
    """Print a reference set's manifest: encoders, counts, parameters."""
    from reme.defaults import default_reference_path
    from reme.errors import ReferenceSetError
    from reme.reference import read_manifest

    try:
        path = reference or default_reference_path()
        man = read_manifest(path)
    except (ReferenceSetError, FileNotFoundError) as exc:
        fail(str(exc))
    if full:
        typer.echo(json.dumps(man, indent=2, sort_keys=True))
        return
    if labels:
        from reme.inference.unlabelled import label_segment_counts
        from reme.reference import load_reference

        try:
            ref = load_reference(path)
        except (ReferenceSetError, FileNotFoundError) as exc:
            fail(str(exc))
        counts = label_segment_counts(ref.pair_label, ref.num_labels)
        order = sorted(range(ref.num_labels), key=lambda j: (-int(counts[j]), ref.labels[j]))
        typer.echo(f"{ref.num_labels} labels, {ref.num_segments} segments ({path})")
        typer.echo("\n".join(f"{int(counts[j]):>8}  {ref.labels[j]}" for j in order))
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


@app.command("inspect", short_help="Write an HTML report on a reference set.")
def inspect_cmd(
    reference: Optional[Path] = typer.Argument(None, help="Reference folder (default: the embedded one)."),
    out: Path = typer.Option(Path("reme_inspect"), help="Report folder (replaced if it holds an earlier report)."),
    image_root: List[Path] = typer.Option([], help="Folder of the source photos (repeatable; default: the manifest's)."),
    max_groups: int = typer.Option(24, help="Largest root-noun groups that get a thumbnail sheet."),
    thumbs: int = typer.Option(8, help="Thumbnails per row in a group sheet."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Write a report on a reference set: counts per stage, group sizes with the knee, synonym pairs,
    kept and dropped segments per group (OUT/index.html)."""
    setup_logging(quiet, verbose)
    from reme.defaults import default_reference_path
    from reme.errors import ReferenceSetError
    from reme.report.inspect import inspect_reference
    from reme.reference import load_reference

    try:
        path = reference or default_reference_path()
        ref = load_reference(path)
        report = inspect_reference(ref, out, image_roots=image_root, max_groups=max_groups, thumbs=thumbs,
                                   reference_path=path)
    except (ReferenceSetError, FileNotFoundError, FileExistsError, ValueError) as exc:
        fail(str(exc))
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Start the demo page: upload a photo, type classes, click a segment to see its evidence
    and teach it by example (needs: pip install "reme[demo]")."""
    setup_logging(quiet, verbose)
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
        fail(str(exc))
    except (ReferenceSetError, MissingWeightsError, FileNotFoundError) as exc:
        fail(str(exc))
