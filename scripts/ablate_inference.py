"""Inference-side ablation of the related-systems options (issue 7) on a labelled folder:
proposal generator (Felzenszwalb vs Split-Matching clustering), GFA smoothing of P_seg over
the segment graph, and the OpenBench "others" answer (counted as a miss of every class).

    python scripts/ablate_inference.py --reference REF --images DIR --masks DIR \
        --classes-file F [--limit N] [--out results.json] \
        [--reference-variant "LABEL=REF2" ...]

``--reference-variant`` adds a row evaluated with default settings on another reference set,
e.g. one built with ``reme build-reference --gfa-with SPEC`` (GFA fusion of two encoders: the
Segmenter rebuilds the fused encoder from that reference's manifest).

Each row is scored by :func:`reme.eval.evaluate` on the folder (``generic`` dataset, native
size, whole image, no background threshold); the "others" row sets the protocol's
``others_threshold``. Prints a Markdown table (mIoU, pixel accuracy, seconds per image) and,
last, one JSON line. SAM proposals are not in the table: no SAM weights can be loaded here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reme.eval import Protocol, evaluate, open_dataset
from reme.reference import load_reference
from reme.inference.segmenter import Segmenter

VARIANTS: dict[str, dict] = {
    "Felzenszwalb (default)": {},
    "clustering proposals, k=8": {"proposals": "cluster", "n_clusters": 8},
    "clustering proposals, k=16": {"proposals": "cluster", "n_clusters": 16},
    "GFA smoothing omega=0.3": {"smooth_omega": 0.3},
    "GFA smoothing omega=0.6": {"smooth_omega": 0.6},
    "others threshold 0.5": {"others_threshold": 0.5},   # a Protocol setting (an answer of no class)
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--masks", type=Path, required=True)
    ap.add_argument("--classes-file", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reference-variant", action="append", default=[], metavar="LABEL=PATH",
                    help="extra row: default settings on another reference set (repeatable)")
    ap.add_argument("--only-reference-variants", action="store_true",
                    help="skip the option rows; baseline row plus the --reference-variant rows")
    ap.add_argument("--segmenter-options", type=json.loads, default={},
                    help='JSON keywords for every row\'s Segmenter, e.g. \'{"proposals": "cluster"}\'')
    ap.add_argument("--baseline-label", default="Felzenszwalb (default)", help="name of the --reference row")
    args = ap.parse_args()
    ds = open_dataset("generic", images=args.images, masks=args.masks, classes_file=args.classes_file,
                      stride=args.stride, limit=args.limit)
    ref = load_reference(args.reference)
    variants = [(name if kw else args.baseline_label, ref, kw) for name, kw in VARIANTS.items()
                if not args.only_reference_variants or not kw]
    for item in args.reference_variant:
        label, eq, path = item.rpartition("=")
        if not eq:
            ap.error(f"--reference-variant must be LABEL=PATH, got {item!r}")
        variants.append((label, load_reference(path), {}))
    rows = []
    for name, reference, kw in variants:
        kw = {**args.segmenter_options, **kw}
        protocol = Protocol(short_side=None, others_threshold=kw.pop("others_threshold", None))
        seg = Segmenter(reference, device="cpu", **kw)
        res = evaluate(seg, ds, protocol, progress=False)
        rows.append({"variant": name, "miou": round(res.scores["miou"], 2), "pixel_acc": round(res.scores["pixel_acc"], 2),
                     "s_per_image": round(res.seconds / max(res.num_images, 1), 2),
                     "visual_encoder": seg.visual_encoder.spec})
    print("| variant | mIoU | pixel acc. | s / image |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['miou']} | {r['pixel_acc']} | {r['s_per_image']} |")
    result = {"images": len(ds), "reference": str(args.reference), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
