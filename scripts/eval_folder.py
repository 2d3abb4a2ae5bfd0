"""mIoU and pixel accuracy of a reference set on a folder of images + index-PNG masks,
next to the score of predicting the most frequent class everywhere.

    python scripts/eval_folder.py --reference REF --images DIR --masks DIR --classes-file F \
        [--ignore-index 255] [--limit N]

Prints one JSON object. For the benchmark protocols of the field use ``reme eval``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from reme.annotations import read_class_names
from reme.io import list_images
from reme.metrics import confusion_matrix, scores_from_confusion
from reme.segmenter import Segmenter


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
    classes = read_class_names(args.classes_file)
    seg = Segmenter(args.reference, device=args.device, top_k=args.top_k or None,
                    segment_logit_scale=args.segment_logit_scale, label_logit_scale=args.label_logit_scale)
    c = len(classes)
    cm = np.zeros((c, c), np.int64)
    images = list_images(args.images)[: args.limit]
    t0 = time.time()
    for path in tqdm(images, desc="eval", unit="img"):
        gt = np.array(Image.open(args.masks / path.relative_to(args.images).with_suffix(".png")))
        cm += confusion_matrix(gt, seg.predict(path, classes).label_map, c, args.ignore_index)
    gt_count = cm.sum(1)
    majority = int(gt_count.argmax())
    cm_major = np.zeros_like(cm)
    cm_major[:, majority] = gt_count
    ours, base = scores_from_confusion(cm), scores_from_confusion(cm_major)
    print(json.dumps({
        "images": len(images), "seconds": round(time.time() - t0, 1), "reference": str(args.reference),
        "miou": round(ours["miou"], 2), "pixel_acc": round(ours["pixel_acc"], 2), "mean_acc": round(ours["mean_acc"], 2),
        "majority_class": classes[majority], "majority_miou": round(base["miou"], 2),
        "majority_pixel_acc": round(base["pixel_acc"], 2),
        "settings": {"top_k": args.top_k, "segment_logit_scale": args.segment_logit_scale,
                     "label_logit_scale": args.label_logit_scale},
    }))


if __name__ == "__main__":
    main()
