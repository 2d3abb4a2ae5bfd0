"""``reme inspect``: a report folder that shows what a reference set holds and what its build
removed (docs/method.md steps 7-10).

Report layout::

    OUT/
      index.html            everything below on one page (open it in a browser)
      summary.json          the numbers of the page (counts, groups, knee, synonyms, drops)
      counts.png            counts after each build stage (manifest ``counts``)
      group_sizes.png       segments per root noun, sorted, with the knee marked (step 8)
      synonyms.png          the synonym pairs added by step 9 and their cosine (if any)
      groups/<root>.png     per group: kept segments from most to least typical (score
                            <S_i, S_center>, step 7) and the pairs dropped for that root

Thumbnails are crops of the source images (``segment_image`` + ``segment_bbox``); when the
image root of the build is not readable here, a placeholder tile says so (pass
``image_roots`` / ``--image-root`` to point at a copy of the photos).
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from reme.io import replace_dir
from reme.report.crops import ReferenceImages, label_tile
from reme.build.filtering import ambiguous_roots, knee_index

logger = logging.getLogger(__name__)

#: Order in which known stage counts are plotted; other keys follow in manifest order.
STAGE_ORDER = ("images", "images_skipped", "captions", "noun_phrases", "proposals", "gt_segments",
               "paired_segments", "pairs", "pairs_after_group_filter", "pairs_after_knee_filter",
               "pairs_after_synonyms", "final_segments", "final_labels", "final_pairs")
_REPORT_MARK = "reme-inspect-report"


def group_sizes(reference) -> dict[str, int]:
    """Segments per root noun as the knee filter (step 8) saw them.

    When the manifest records them (``knee_group_sizes``: root -> size, written by the build
    at step 8), those are returned. Otherwise they are reconstructed from the stored set:
    kept segments are counted per root of their labels in O_ref; segments whose pair was
    removed by the knee filter (``dropped`` reason ``"knee_filter"``) are added back, since
    the filter ran before they were removed. Pairs removed earlier by the group filter are
    not counted (the knee filter never saw them). Synonym labels added by step 9 after the
    knee filter are counted under their substituted root, so a root's size here can exceed
    the one the build used by the synonym pairs it gained.

    Returns:
        root -> number of distinct segments, largest first.
    """
    recorded = reference.manifest.get("knee_group_sizes")
    if isinstance(recorded, dict) and recorded:
        return dict(sorted(((str(r), int(v)) for r, v in recorded.items()), key=lambda kv: (-kv[1], kv[0])))
    roots = np.asarray(reference.roots, dtype=object)
    per_root: dict[str, set] = {}
    for s, j in zip(np.asarray(reference.pair_segment).tolist(), np.asarray(reference.pair_label).tolist()):
        per_root.setdefault(roots[j], set()).add(("k", s))
    d = reference.dropped
    for img, box, root, reason in zip(d["image"], np.asarray(d["bbox"]).tolist(), d["root"], d["reason"]):
        if reason == "knee_filter":
            per_root.setdefault(root, set()).add(("d", img, tuple(box)))
    return dict(sorted(((r, len(v)) for r, v in per_root.items()), key=lambda kv: (-kv[1], kv[0])))


def group_scores(reference, root: str) -> tuple[np.ndarray, np.ndarray]:
    """Kept segments of one root and their group-filter score <S_i, S_center> (step 7).

    Returns:
        ``(segment_ids, scores)``: (g,) int64 rows of S_ref carrying a label of ``root`` and
        (g,) float32 cosine to the group's element-wise median S_center, most typical first.
    """
    lab = np.flatnonzero(np.asarray(reference.roots, dtype=object) == root)
    segs = np.unique(np.asarray(reference.pair_segment)[np.isin(reference.pair_label, lab)])
    if segs.size == 0:
        return segs.astype(np.int64), np.zeros(0, np.float32)
    S = np.asarray(reference.S_ref[segs], np.float32)
    center = np.median(S, axis=0)
    norm = np.linalg.norm(center)
    center = center / norm if norm > 0 else center
    score = (S @ center).astype(np.float32)
    order = np.argsort(-score, kind="stable")
    return segs[order].astype(np.int64), score[order]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "root"


def _counts_groups(counts: dict[str, Any]) -> dict[str, list[tuple[str, float]]]:
    """Split counts into blocks by prefix (``coco_images`` -> block ``coco``), stage order kept."""
    # a part of a concatenated set is a prefix p with its own "p_images" count (coco_images, ...)
    prefixes = sorted({k[: -len("_images")] for k in counts if k.endswith("_images") and k != "images"},
                      key=len, reverse=True)
    blocks: dict[str, dict[str, float]] = {}
    for key, val in counts.items():
        if not isinstance(val, (int, float)) or isinstance(val, bool):
            continue
        prefix, stage = "", key
        for p in prefixes:
            if key.startswith(p + "_"):
                prefix, stage = p, key[len(p) + 1:]
                break
        blocks.setdefault(prefix, {})[stage] = val
    rank = {s: i for i, s in enumerate(STAGE_ORDER)}
    return {p: sorted(b.items(), key=lambda kv: rank.get(kv[0], len(rank))) for p, b in blocks.items()}


def _plot_counts(blocks, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(blocks))
    rows = max((len(v) for v in blocks.values()), default=1)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 0.45 * rows + 1.4), squeeze=False)
    for ax, (prefix, items) in zip(axes[0], blocks.items() or [("", [])]):
        names = [k for k, _ in items][::-1]
        vals = [v for _, v in items][::-1]
        bars = ax.barh(names, vals, color="#4C78A8")
        for b, v in zip(bars, vals):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:,.0f}", va="center", fontsize=8)
        ax.set_xscale("symlog")
        ax.set_title(f"counts per stage{' (' + prefix + ')' if prefix else ''}", fontsize=10)
        ax.margins(x=0.25)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_group_sizes(sizes: dict[str, int], knee: int, removed: Sequence[str], ran: bool, path: Path,
                      label_top: int = 12, note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roots, vals = list(sizes), np.array(list(sizes.values()), np.float64)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    x = np.arange(len(vals))
    removed_set = set(removed)
    colors = ["#E45756" if r in removed_set else "#4C78A8" for r in roots]
    ax.bar(x, vals, color=colors, width=1.0 if len(vals) > 60 else 0.8)
    if len(vals) >= 3:
        ax.axvline(knee - 0.5, color="#F58518", ls="--", lw=1.5,
                   label=(f"knee (log sizes) recomputed on these sizes: rank {knee}" if ran else
                          f"knee (log sizes) at rank {knee}: roots left of it would be removed"))
    if len(vals) <= 40:  # few bars: name them
        for i in range(min(label_top, len(vals))):
            ax.text(i, vals[i], " " + roots[i], rotation=90, va="bottom", ha="center", fontsize=7)
    else:  # many narrow bars: list the largest groups in a box instead
        lines = [f"{'*' if r in removed_set else ' '} {r}: {int(v)}" for r, v in zip(roots[:label_top], vals)]
        ax.text(0.98, 0.80, "largest groups (* removed)\n" + "\n".join(lines), transform=ax.transAxes,
                ha="right", va="top", fontsize=7, family="monospace", multialignment="left",
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "#bbb"})
    ax.set_yscale("log")
    ax.set_xlabel("root noun, sorted by group size" + ("\n" + textwrap.fill(note, 110) if note else ""), fontsize=9)
    ax.set_ylabel("segments in group (log)")
    state = "knee filter ran; red = removed by the build" if ran else "knee filter not run; red = what it would remove"
    ax.set_title(f"Group sizes of {len(vals)} roots ({state})", fontsize=10)
    if len(vals) >= 3:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylim(top=max(vals.max(initial=1) * 8, 10))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_synonyms(pairs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{a} ~ {b}" for a, b, _ in pairs][::-1]
    vals = [float(v) for _, _, v in pairs][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.28 * len(pairs) + 1.2))
    ax.barh(names, vals, color="#54A24B")
    ax.set_xlabel("cosine of the root embeddings (text encoder)")
    ax.set_title(f"{len(pairs)} synonym pairs added (step 9, k_sim)", fontsize=10)
    ax.set_xlim(max(-1.0, min(vals) - 0.05), 1.0)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _strip(tiles: list[Image.Image], title: str, width: int) -> Image.Image:
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    h = max((t.height for t in tiles), default=24)
    width = max(width, int(font.getlength(title)) + 10, 10 + len(tiles) * (tiles[0].width + 4) if tiles else 0)
    out = Image.new("RGB", (width, h + 18), (255, 255, 255))
    ImageDraw.Draw(out).text((4, 2), title, fill=(0, 0, 0), font=font)
    for i, t in enumerate(tiles):
        out.paste(t, (4 + i * (t.width + 4), 16))
    return out


def _group_sheet(reference, root: str, images: ReferenceImages, thumbs: int, size: int) -> tuple[Image.Image, dict]:
    segs, score = group_scores(reference, root)
    # kept: evenly spaced from most to least typical, so the spread of the group is visible
    pick = np.unique(np.linspace(0, len(segs) - 1, min(thumbs, len(segs))).round().astype(int)) if len(segs) else []
    kept = [label_tile(images.thumbnail(reference.segment_image[segs[i]], reference.segment_bbox[segs[i]], size),
                       [f"#{segs[i]} score {score[i]:.3f}"]) for i in pick]
    d = reference.dropped
    idx = [i for i, r in enumerate(d["root"]) if r == root]
    dscore = np.asarray(d["score"], np.float32)
    idx.sort(key=lambda i: (np.nan_to_num(dscore[i], nan=np.inf), i))  # lowest score (least typical) first
    dropped = []
    for i in idx[:thumbs]:
        note = f"{d['reason'][i]}" + ("" if np.isnan(dscore[i]) else f" {dscore[i]:.3f}")
        dropped.append(label_tile(images.thumbnail(d["image"][i], d["bbox"][i], size), [note, d["label"][i]]))
    width = 10 + thumbs * (size + 4)
    parts = [_strip(kept, f"{root}: {len(segs)} kept segments (shown: most -> least typical, "
                          f"score <S_i, S_center>)", width),
             _strip(dropped, f"{root}: {len(idx)} dropped pairs" + ("" if idx else " (none)")
                    + (" (shown: lowest score first)" if idx else ""), width)]
    sheet = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts) + 6), (255, 255, 255))
    y = 0
    for p in parts:
        sheet.paste(p, (0, y))
        y += p.height + 6
    reasons: dict[str, int] = {}
    for i in idx:
        reasons[d["reason"][i]] = reasons.get(d["reason"][i], 0) + 1
    info = {"root": root, "kept_segments": int(len(segs)), "dropped_pairs": len(idx), "dropped_by_reason": reasons,
            "score_min": float(score.min()) if len(score) else None,
            "score_median": float(np.median(score)) if len(score) else None}
    return sheet, info


def inspect_reference(reference, out: str | Path, *, image_roots: Sequence[str | Path] = (),
                      max_groups: int = 24, thumbs: int = 8, thumb_size: int = 96,
                      reference_path: str | Path | None = None) -> Path:
    """Write the inspection report of a reference set (module docstring).

    Args:
        reference: a [`reme.reference.ReferenceSet`][reme.reference.ReferenceSet].
        out: report folder; replaced if it holds an earlier report, refused if it holds
            anything else.
        image_roots: extra folders holding the source photos (searched before the manifest's).
        max_groups: groups (largest first, plus every group the knee filter removed) that get
            a thumbnail sheet.
        thumbs: thumbnails per row (kept / dropped) in a group sheet.
        thumb_size: thumbnail edge in pixels.
        reference_path: shown in the report's title.

    Returns:
        The report folder.

    Raises:
        FileExistsError: ``out`` exists, is not empty and is not an earlier report.
        ValueError: ``max_groups`` < 0 or ``thumbs`` < 1.
    """
    if max_groups < 0 or thumbs < 1:
        raise ValueError(f"max_groups must be >= 0 and thumbs >= 1, got {max_groups}, {thumbs}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and _REPORT_MARK not in _read(out / "summary.json"):
        raise FileExistsError(f"{out} exists and is not a reme inspect report; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        summary = _write_report(reference, tmp, image_roots, max_groups, thumbs, thumb_size, reference_path)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote inspection report %s (%d groups, knee at %s)", out, summary["num_groups"], summary["knee_rank"])
    return out


def syn_present(manifest: dict[str, Any]) -> bool:
    """True when the build added synonym labels (step 9)."""
    return bool(manifest.get("synonym_pairs"))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def _write_report(ref, out: Path, image_roots, max_groups, thumbs, thumb_size, reference_path) -> dict:
    man = ref.manifest
    images = ReferenceImages.for_reference(ref, image_roots)
    sizes = group_sizes(ref)
    vals = np.array(list(sizes.values()))
    recorded_knee = man.get("knee_filter", {}).get("knee_rank") if isinstance(man.get("knee_filter"), dict) else None
    knee = int(recorded_knee) if recorded_knee is not None else (knee_index(vals) if len(vals) else 0)
    ran = "ambiguous_roots_removed" in man
    removed = list(man.get("ambiguous_roots_removed", [])) if ran else ambiguous_roots(sizes)
    recorded = bool(man.get("knee_group_sizes"))
    note = "" if recorded or not syn_present(man) else (
        "sizes reconstructed from the saved set (kept + knee-dropped segments); synonym labels "
        "added after the knee filter (step 9) inflate some groups")
    _plot_group_sizes(sizes, knee, removed, ran, out / "group_sizes.png", note=note)
    blocks = _counts_groups(man.get("counts", {}))
    _plot_counts(blocks, out / "counts.png")
    syn = [tuple(p) for p in man.get("synonym_pairs", []) or []]
    if syn:
        _plot_synonyms(syn, out / "synonyms.png")
    (out / "groups").mkdir()
    chosen = list(sizes)[:max_groups]
    chosen += [r for r in removed if r not in chosen]
    chosen += [r for r in dict.fromkeys(ref.dropped["root"]) if r not in chosen][: max(0, max_groups - len(chosen))]
    groups = []
    for root in chosen:
        sheet, info = _group_sheet(ref, root, images, thumbs, thumb_size)
        info["file"] = f"groups/{_slug(root)}.png"
        sheet.save(out / info["file"])
        info["size"] = sizes.get(root, 0)
        info["removed_as_ambiguous"] = root in removed
        groups.append(info)
    reasons: dict[str, int] = {}
    for r in ref.dropped["reason"]:
        reasons[r] = reasons.get(r, 0) + 1
    sources: dict[str, int] = {}
    for s in ref.segment_source:
        sources[s] = sources.get(s, 0) + 1
    summary = {
        "kind": _REPORT_MARK, "reference": str(reference_path) if reference_path else None,
        "mode": man.get("mode"), "encoders": man.get("encoders", {}),
        "num_segments": ref.num_segments, "num_labels": ref.num_labels, "num_pairs": int(ref.pair_segment.size),
        "num_groups": len(sizes), "knee_rank": int(knee), "knee_filter_ran": ran, "ambiguous_roots": removed,
        "group_sizes_source": "manifest" if recorded else "reconstructed",
        "group_sizes": sizes, "counts": man.get("counts", {}), "synonym_pairs": [list(p) for p in syn],
        "dropped_by_reason": reasons, "segment_source": sources,
        "image_roots": [str(r) for r in images.roots], "images_readable": images.readable, "groups": groups,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "index.html").write_text(_html(summary, syn, bool(syn)))
    return summary


def _table(rows, head) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def _html(s: dict, syn, has_syn: bool) -> str:
    e = html.escape
    title = f"reme inspect: {s['reference'] or 'reference set'}"
    ran = s["knee_filter_ran"]
    knee_txt = (f"The build's knee filter (docs/method.md step 8) removed {len(s['ambiguous_roots'])} root(s): "
                if ran else "This build did not run the knee filter (GT mode, or disabled); on these sizes it "
                            f"would remove {len(s['ambiguous_roots'])} root(s): ")
    img_note = ("" if s["images_readable"] else
                "<p class='warn'>Source images are not readable here (image roots: "
                f"{e(', '.join(s['image_roots']) or 'none found')}); thumbnails are placeholders. "
                "Pass <code>--image-root DIR</code> pointing at the photos the set was built from.</p>")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
        "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}"
        "img{max-width:100%;border:1px solid #ddd}.warn{color:#a33}h2{margin-top:1.6em}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>mode <b>{e(str(s['mode']))}</b>; encoders {e(json.dumps(s['encoders']))}; "
        f"{s['num_segments']:,} segments (S_ref), {s['num_labels']:,} labels (L_ref), "
        f"{s['num_pairs']:,} pairs (O_ref nonzeros), {s['num_groups']:,} root-noun groups.</p>",
        img_note,
        "<h2 id='counts'>Counts per stage</h2><img src='counts.png' alt='counts per stage'>",
        _table(sorted(s["counts"].items()), ["count", "value"]),
        "<h2 id='provenance'>Provenance</h2>",
        "<p>Stage that produced each kept segment:</p>",
        _table(sorted(s["segment_source"].items()), ["segment source", "segments"]),
        "<p>Pairs removed while building (dropped.parquet):</p>",
        _table(sorted(s["dropped_by_reason"].items()) or [("(none)", 0)], ["reason", "pairs"]),
        "<h2 id='groups'>Group sizes and the knee (step 8)</h2><img src='group_sizes.png' alt='group sizes'>",
        f"<p>{e(knee_txt)}{e(', '.join(s['ambiguous_roots']) or '(none)')}. Knee rank {s['knee_rank']} "
        "(steepest drop of the log sizes, <code>reme.build.filtering.knee_index</code>).</p>",
        "<h2 id='synonyms'>Synonym pairs (step 9)</h2>",
        ("<img src='synonyms.png' alt='synonym pairs'>" + _table(syn, ["root a", "root b", "cosine"]))
        if has_syn else "<p>No synonym pairs in this build (GT mode, or k_sim = 0).</p>",
        "<h2 id='thumbs'>Groups: kept and dropped segments (step 7)</h2>",
        _table([(g["root"], g["size"], g["kept_segments"], g["dropped_pairs"],
                 "" if g["score_median"] is None else f"{g['score_median']:.3f}",
                 "yes" if g["removed_as_ambiguous"] else "") for g in s["groups"]],
               ["root", "group size", "kept segments", "dropped pairs", "median score",
                "removed by knee" if ran else "knee would remove"]),
    ]
    for g in s["groups"]:
        parts.append(f"<h3 id='g-{e(_slug(g['root']))}'>{e(g['root'])}</h3>"
                     f"<img src='{e(g['file'])}' alt='thumbnails of {e(g['root'])}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
