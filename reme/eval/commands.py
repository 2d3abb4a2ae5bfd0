"""Bodies of ``reme eval`` and ``reme ablate`` (the Typer declarations live in ``reme.cli``)."""

from __future__ import annotations

import logging
from pathlib import Path

from reme.eval import open_dataset
from reme.eval.protocol import Protocol, benchmark_protocol
from reme.eval.report import markdown_table, write_json

logger = logging.getLogger(__name__)


def protocol_overrides(*, short_side: int | None = None, mode: str | None = None, crop: int | None = None,
                       window_stride: int | None = None, background: str | None = None,
                       bg_threshold: float | None = None, others_threshold: float | None = None,
                       synonyms: bool = True) -> dict:
    """The CLI's protocol options as `benchmark_protocol` overrides (None = keep the default;
    ``short_side=0`` = native resolution)."""
    over: dict = {"synonyms": synonyms}
    if short_side is not None:
        over["short_side"] = short_side or None
    for key, val in (("mode", mode), ("crop", crop), ("stride", window_stride), ("background", background),
                     ("bg_threshold", bg_threshold), ("others_threshold", others_threshold)):
        if val is not None:
            over[key] = val
    return over


def build_protocol(dataset, **options) -> Protocol:
    """The dataset's default protocol with the CLI's overrides (`protocol_overrides`)."""
    return benchmark_protocol(dataset.spec, **protocol_overrides(**options))


def parse_counts(text: str) -> list[int]:
    """'0,10,50' -> [0, 10, 50] (ValueError on anything else)."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from exc
    if not out or any(n < 0 for n in out):
        raise ValueError(f"expected non-negative counts, got {text!r}")
    return out


def parse_floats(text: str) -> list[float]:
    """'0.2,0.5' -> [0.2, 0.5] (ValueError on anything else)."""
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from exc
    if not out:
        raise ValueError(f"expected at least one number, got {text!r}")
    return out


def run_eval(*, dataset: str, reference, out: Path | None, root=None, split=None, images=None, masks=None,
             classes_file=None, ignore_index=None, reduce_zero_label=False, background_name=None, limit=None,
             stride: int = 1, offset: int = 0, protocol_kw: dict | None = None, vis: int = 4, distractors: str | None = None,
             overlap: bool = False, bg_sweep: str | None = None, hold_out: str | None = None,
             others_sweep: str | None = None, segmenter_kw: dict | None = None, device=None,
             progress: bool = True, layout: str | None = None) -> str:
    """Run ``reme eval``; returns the text to print (Markdown)."""
    from reme.eval.openbench import distractor_sweep, others_analysis, vocabulary_overlap
    from reme.eval.runner import as_segmenter, evaluate, sweep_thresholds

    ds = open_dataset(dataset, root, split=split, images=images, masks=masks, classes_file=classes_file,
                      ignore_index=ignore_index, reduce_zero_label=(reduce_zero_label or None) if dataset == "generic"
                      else None, background=background_name, limit=limit, stride=stride, offset=offset,
                      layout=layout)
    protocol = build_protocol(ds, **(protocol_kw or {}))
    seg = as_segmenter(reference, device=device, **(segmenter_kw or {}))
    res = evaluate(seg, ds, protocol, out_dir=out, num_vis=vis, progress=progress, reference_path=reference)
    d = res.to_dict(with_confusion=False)
    lay = (ds.meta.get("layout") or {}).get("name")
    lines = [f"{ds.name}: mIoU {d['miou']:.2f}  pixel acc. {d['pixel_acc']:.2f}  mean acc. {d['mean_acc']:.2f}  "
             f"({d['num_images']} images, {d['seconds_per_image']:.2f} s/image; majority class "
             f"{d['majority']['class']!r}: mIoU {d['majority']['miou']:.2f}, pixel acc. {d['majority']['pixel_acc']:.2f})"
             + (f"; {lay} layout" if lay else "")]
    extra: dict = {}
    if overlap:
        ov = vocabulary_overlap(seg, ds.classes)
        extra["vocabulary_overlap"] = ov
        lines.append(f"vocabulary overlap with the reference labels: {ov['mean']:.3f} "
                     f"({ov['num_reference_labels']} reference labels)")
    if distractors:
        sweep = distractor_sweep(seg, ds, parse_counts(distractors), protocol, out_dir=out, progress=progress)
        extra["distractor_sweep"] = sweep
        rows = [{"n": n, "m": m, "p": p} for n, m, p in zip(sweep["num_distractors"], sweep["miou"], sweep["pixel_acc"])]
        lines.append("distractor sweep:\n" + markdown_table(rows, ["n", "m", "p"], ["distractors", "mIoU", "pixel acc."]))
    if bg_sweep:
        rows = sweep_thresholds(seg, ds, parse_floats(bg_sweep), protocol, kind="background", progress=progress)
        extra["background_sweep"] = rows
        lines.append("background threshold sweep:\n" + markdown_table(
            [{**r, "set_fraction": 100 * r["set_fraction"]} for r in rows],
            ["threshold", "miou", "pixel_acc", "set_fraction"],
            ["threshold", "mIoU", "pixel acc.", "pixels below threshold %"]))
    if hold_out:
        held = [h.strip() for h in hold_out.split(",") if h.strip()]
        rows = others_analysis(seg, ds, held, parse_floats(others_sweep or "0,0.3,0.4,0.5,0.6,0.7"), protocol,
                               progress=progress)
        extra["others_analysis"] = {"held_out": held, "rows": rows}
        lines.append(f"'others' analysis, held out {held}:\n" + markdown_table(
            [{**r, "others_fraction": 100 * r["others_fraction"]} for r in rows],
            ["threshold", "miou", "miou_listed", "others_iou", "pixel_acc", "others_fraction"],
            ["threshold", "mIoU (listed + others)", "mIoU listed", "others IoU", "pixel acc.", "answered others %"]))
    if out is not None:
        if extra:
            write_json({**res.to_dict(), **extra}, Path(out) / "results.json")
        lines.append(f"wrote {Path(out) / 'results.json'}, results.md, confusion.png"
                     + (f", vis/ ({min(vis, d['num_images'])} images)" if vis else ""))
    return "\n".join(lines)


def run_eval_suite(*, suite: str, reference, out: Path | None, data_root=None, layout: str | None = None,
                   limit: int | None = None, protocol_kw: dict | None = None, vis: int = 0,
                   segmenter_kw: dict | None = None, device=None, progress: bool = True) -> str:
    """Run ``reme eval --suite paper``; returns the text to print (one line per benchmark and the
    summary table). ``out`` defaults to ``eval_paper``."""
    from reme.eval.runner import as_segmenter
    from reme.eval.suite import default_data_root, run_suite, summary_markdown

    if suite != "paper":
        raise ValueError(f"--suite must be 'paper', got {suite!r}")
    data_root = Path(data_root) if data_root is not None else default_data_root()
    if not data_root.is_dir():
        raise FileNotFoundError(f"datasets root not found: {data_root} (give --data-root or set $DETECTRON2_DATASETS)")
    out = Path(out) if out is not None else Path("eval_paper")
    summary = run_suite(lambda: as_segmenter(reference, device=device, **(segmenter_kw or {})), data_root, out,
                        reference_path=reference, protocol_overrides=protocol_overrides(**(protocol_kw or {})),
                        layout=layout, limit=limit, num_vis=vis, progress=progress, segmenter_kwargs=segmenter_kw)
    return summary_markdown(summary) + f"\nwrote {out / 'summary.md'}, {out / 'summary.json'}"


def run_ablate(*, kind: str, dataset: str, out: Path | None, root=None, split=None, images=None, masks=None,
               classes_file=None, limit=None, stride: int = 1, protocol_kw: dict | None = None,
               reference=None, noise: float = 0.3, seed: int = 0, photos=None, captions=None,
               pairing_encoder: str | None = None, visual_encoder: str = "classical", text_encoder: str = "minilm",
               photo_limit: int | None = None, segmenter_kw: dict | None = None, device=None,
               progress: bool = True) -> str:
    """Run ``reme ablate``; returns the Markdown table."""
    from reme.eval.ablation import ablate_caption, ablate_noisy_gt, ablation_table

    ds = open_dataset(dataset, root, split=split, images=images, masks=masks, classes_file=classes_file,
                      limit=limit, stride=stride)
    protocol = build_protocol(ds, **(protocol_kw or {}))
    if kind == "noisy-gt":
        from reme.reference import load_reference

        if reference is None:
            raise ValueError("--kind noisy-gt needs --reference (a GT-mode reference set)")
        ref = load_reference(reference)
        rows = ablate_noisy_gt(ref, ds, protocol, noise=noise, seed=seed, segmenter_kwargs=segmenter_kw,
                               device=device, out_dir=out, progress=progress)
        head = (f"noisy-GT ablation: {reference}, {noise:.0%} of the labels replaced (seed {seed}); "
                f"{ds.name}, {len(ds)} images\n")
    elif kind == "caption":
        if photos is None or captions is None or pairing_encoder is None:
            raise ValueError("--kind caption needs --photos, --captions and --pairing-encoder")
        from reme.io import list_images

        keys = [p.relative_to(photos).as_posix() for p in list_images(photos)][:photo_limit]
        rows = ablate_caption(photos, f"captions:{captions}", pairing_encoder, visual_encoder, text_encoder, ds,
                              protocol, images=keys, segmenter_kwargs=segmenter_kw, device=device, out_dir=out,
                              progress=progress)
        head = (f"caption-mode ablation: {len(keys)} photos of {photos}, captions {captions}, pairing "
                f"{pairing_encoder}, visual {visual_encoder}, text {text_encoder}; {ds.name}, {len(ds)} images\n")
    else:
        raise ValueError(f"--kind must be noisy-gt or caption, got {kind!r}")
    return head + ablation_table(rows, kind)


__all__ = ["build_protocol", "parse_counts", "parse_floats", "protocol_overrides", "run_ablate", "run_eval",
           "run_eval_suite"]
