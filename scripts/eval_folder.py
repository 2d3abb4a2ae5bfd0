"""mIoU and pixel accuracy of a reference set on a folder of images + index-PNG masks,
next to the score of predicting the most frequent class everywhere.

    python scripts/eval_folder.py --reference REF --images DIR --masks DIR --classes-file F \
        [--ignore-index 255] [--limit N]

Prints one JSON object. Images are segmented at their native size, whole image, no
background threshold (``reme eval --dataset generic --short-side 0`` with the same data gives
the same scores plus the report files). For the benchmark protocols of the field use
``reme eval``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reme.eval import Protocol, evaluate, open_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--masks", type=Path, required=True)
    ap.add_argument("--classes-file", type=Path, required=True)
    ap.add_argument("--ignore-index", type=int, default=255)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--top-k", type=int, default=10, help="0 = softmax over all reference segments")
    ap.add_argument("--segment-logit-scale", type=float, default=50.0)
    ap.add_argument("--label-logit-scale", type=float, default=50.0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    ds = open_dataset("generic", images=args.images, masks=args.masks, classes_file=args.classes_file,
                      ignore_index=args.ignore_index, limit=args.limit)
    res = evaluate(args.reference, ds, Protocol(short_side=None), device=args.device,
                   segmenter_kwargs=dict(top_k=args.top_k or None, segment_logit_scale=args.segment_logit_scale,
                                         label_logit_scale=args.label_logit_scale))
    d = res.to_dict(with_confusion=False)
    print(json.dumps({
        "images": d["num_images"], "seconds": round(d["seconds"], 1), "reference": str(args.reference),
        "miou": round(d["miou"], 2), "pixel_acc": round(d["pixel_acc"], 2), "mean_acc": round(d["mean_acc"], 2),
        "majority_class": d["majority"]["class"], "majority_miou": round(d["majority"]["miou"], 2),
        "majority_pixel_acc": round(d["majority"]["pixel_acc"], 2),
        "settings": {"top_k": args.top_k, "segment_logit_scale": args.segment_logit_scale,
                     "label_logit_scale": args.label_logit_scale},
    }))


if __name__ == "__main__":
    main()
