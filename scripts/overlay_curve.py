"""Domain shift fixed by example (issue 15): mIoU on a held-out sequence as the ground truth of
N of its frames is added to an overlay (`Segmenter.add_examples`), against the base reference
and a reference built with all of that sequence's frames.

    python scripts/overlay_curve.py --base REF_BASE --full REF_FULL \\
        --pool-images $D/camvid/images/train --pool-masks $D/camvid/masks/train --sequence 0016E5 \\
        --eval-images $D/camvid/images/val --eval-masks $D/camvid/masks/val \\
        --classes-file $D/camvid/classes.txt --n 1 2 5 10 --draws 3 --out curve.json

The base reference must not contain the sequence; the pool is the sequence's frames in the
train split, the evaluation frames its frames in the val split (disjoint). For each draw, the
pool is shuffled (seed = draw) and frames are added one at a time; after N frames the
evaluation folder is scored (``reme.eval.evaluate``, ``generic`` dataset, native size, whole
image). Proposals and S_test of the evaluation frames are computed once (``view_cache_size``):
only retrieval is repeated. Prints a Markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from reme.build.annotations import MaskFolder
from reme.classes import read_class_file
from reme.eval import evaluate, open_dataset
from reme.eval.commands import build_protocol
from reme.io import load_image
from reme.reference import load_reference
from reme.inference.segmenter import Segmenter


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="reference built without the sequence")
    ap.add_argument("--full", type=Path, required=True, help="reference built with all of the sequence's pool frames")
    ap.add_argument("--pool-images", type=Path, required=True)
    ap.add_argument("--pool-masks", type=Path, required=True)
    ap.add_argument("--sequence", required=True, help="file-name prefix of the held-out sequence")
    ap.add_argument("--eval-images", type=Path, required=True)
    ap.add_argument("--eval-masks", type=Path, required=True)
    ap.add_argument("--classes-file", type=Path, required=True)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 2, 5, 10])
    ap.add_argument("--draws", type=int, default=3, help="random orders of the pool (seeds 0..draws-1)")
    ap.add_argument("--nearest", action="store_true",
                    help="also add the pool frames nearest in time to the evaluation frames first (the number "
                         "at the end of the file name is the frame number)")
    ap.add_argument("--stride", type=int, default=1, help="every stride-th evaluation frame")
    ap.add_argument("--example-bias", type=float, nargs="+", default=[0.0],
                    help="Segmenter example_bias values scored at every point (0 = plain eq. 1)")
    ap.add_argument("--all-pool", action="store_true", help="also score base + an overlay of every pool frame")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    ds = open_dataset("generic", images=args.eval_images, masks=args.eval_masks, classes_file=args.classes_file,
                      stride=args.stride)
    keys = [s.key for s in ds.samples]
    if not all(Path(k).name.startswith(args.sequence) for k in keys):
        raise SystemExit(f"every evaluation frame must belong to {args.sequence}")
    base = load_reference(args.base)
    if any(Path(k).name.startswith(args.sequence) for k in base.segment_image):
        raise SystemExit(f"the base reference holds frames of {args.sequence}; build it without them")
    names = [c[0] for c in read_class_file(args.classes_file)]
    masks = MaskFolder(args.pool_masks, names)
    pool = sorted(str(p.relative_to(args.pool_images)) for p in args.pool_images.rglob("*.png")
                  if p.name.startswith(args.sequence))
    proto = build_protocol(ds, short_side=0)
    # every evaluation frame's and every added frame's view stays cached: only retrieval is repeated
    seg = Segmenter(base, device="cpu", view_cache_size=len(keys) + len(pool) + 1)

    def score(model, label: str) -> float:
        t = time.perf_counter()
        r = evaluate(model, ds, proto, progress=False)
        print(f"  {label}: mIoU {r.miou:.2f} ({time.perf_counter() - t:.0f} s)", flush=True)
        return r.miou

    print(f"{len(keys)} evaluation frames, {len(pool)} pool frames of {args.sequence}", flush=True)
    m0 = score(seg, "base (N=0, first pass: encoder + proposals)")
    m0_again = score(seg, "base again (cached views: retrieval only)")
    assert abs(m0 - m0_again) < 1e-9, "cached views must give the same result"
    m_full = score(Segmenter(load_reference(args.full), device="cpu"), "full reference")
    biases = args.example_bias
    curve = {b: {n: [] for n in args.n} for b in biases}       # bias -> N -> mIoU per random draw
    near: dict[float, dict[int, float]] = {b: {} for b in biases}
    add_s: list[float] = []
    rows: dict[int, list[int]] = {n: [] for n in args.n}
    size: dict[int, list[int]] = {n: [] for n in args.n}
    orders = [("random", d, [pool[i] for i in np.random.default_rng(d).permutation(len(pool))]) for d in range(args.draws)]
    if args.nearest:
        frame = lambda k: int(re.sub(r"\D", "", Path(k).stem.rsplit("_", 1)[-1]))  # noqa: E731
        dist = {k: min(abs(frame(k) - frame(e)) for e in keys) for k in pool}
        orders.append(("nearest", 0, sorted(pool, key=lambda k: (dist[k], k))))
    for kind, d, order in orders:
        seg.remove_examples("all")
        for i, key in enumerate(order[:max(args.n)], 1):
            img = load_image(args.pool_images / key)
            lm = masks.label_map(key, img.shape[:2])
            t = time.perf_counter()
            seg.add_examples(img, lm, names, image_name=key)
            add_s.append(time.perf_counter() - t)
            if i not in args.n:
                continue
            if kind == "random":
                with tempfile.TemporaryDirectory() as tmp:
                    size[i].append(folder_bytes(seg.save_overlay(Path(tmp) / "overlay")))
                rows[i].append(seg.overlay.num_rows)
            for b in biases:
                seg.example_bias = b
                m = score(seg, f"{kind} {d}, N={i}, example_bias={b} ({', '.join(order[:i][:3])}{'...' if i > 3 else ''})")
                (curve[b][i].append(m) if kind == "random" else near[b].__setitem__(i, m))
    seg.remove_examples("all")
    seg.example_bias = 0.0
    m_all = None
    if args.all_pool:
        for key in pool:
            img = load_image(args.pool_images / key)
            seg.add_examples(img, masks.label_map(key, img.shape[:2]), names, image_name=key)
        m_all = score(seg, f"base + overlay of all {len(pool)} pool frames")
    gap = (m_full - m0) or float("nan")
    out = {"base": m0, "full": m_full, "all_pool_overlay": m_all, "eval_frames": len(keys), "pool_frames": len(pool),
           "seconds_per_added_frame_median": statistics.median(add_s) if add_s else None, "curve": {}}
    for b in biases:
        nb = near[b]
        print(f"\nexample_bias={b}\n\n| N frames added | mIoU, random frames (mean of {args.draws} draws) | min - max | "
              f"gap closed |{' mIoU, nearest frames first | gap closed |' if nb else ''} overlay rows | overlay size |")
        print("|---|---|---|---|" + ("---|---|" if nb else "") + "---|---|")
        print(f"| 0 (base) | {m0:.2f} | | 0% |" + (f" {m0:.2f} | 0% |" if nb else "") + " 0 | |")
        for n in args.n:
            v = curve[b][n]
            mean = statistics.fmean(v)
            nc = f" {nb[n]:.2f} | {100 * (nb[n] - m0) / gap:.0f}% |" if n in nb else ""
            print(f"| {n} | {mean:.2f} | {min(v):.2f} - {max(v):.2f} | {100 * (mean - m0) / gap:.0f}% |{nc} "
                  f"{statistics.fmean(rows[n]):.0f} | {statistics.fmean(size[n]) / 1e6:.2f} MB |")
            out["curve"].setdefault(str(b), {})[n] = {"miou": v, "mean": mean, "gap_closed": (mean - m0) / gap,
                                                       "rows": rows[n], "bytes": size[n], "nearest_miou": nb.get(n)}
    print(f"\n| all {len(pool)} (full reference, built) | {m_full:.2f} | | 100% |")
    if m_all is not None:
        print(f"| all {len(pool)} (base + overlay, example_bias=0) | {m_all:.2f} | | {100 * (m_all - m0) / gap:.0f}% |")
    if add_s:
        print(f"\nadd_examples per frame (encoder pass included): median {statistics.median(add_s):.2f} s, "
              f"max {max(add_s):.2f} s over {len(add_s)} frames")
    print(json.dumps(out))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
