"""Cache, per image, what the "none of these" experiments need (issue 19), so that threshold
sweeps never re-run the encoder: dense features (float16), then per (reference, proposal
settings) the Felzenszwalb segment ids, S_test and the exact top-10 neighbours in S_ref.

    python scripts/none_cache.py feats --cache /tmp/none_cache
    python scripts/none_cache.py neighbours --cache /tmp/none_cache --reference reference_sets/default --tag default
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from reme.defaults import shared_data_dir


def image_lists(data: Path) -> dict[str, list[Path]]:
    """The splits: every 4th CamVid train frame NOT in the embedded reference (it takes every 3rd),
    every 3rd CamVid val frame, every 2nd coco_tiny train and val photo (few: the test machine
    has 2 shared cores)."""
    cam = sorted((data / "camvid" / "images" / "train").glob("*.png"))
    in_default = set(p.name for p in cam[::3])
    return {
        "camvid_train_out": [p for p in cam if p.name not in in_default][::4],
        "camvid_val": sorted((data / "camvid" / "images" / "val").glob("*.png"))[::3],
        "coco_train": sorted((data / "coco_tiny" / "images" / "train2017").glob("*.jpg"))[::2],
        "coco_val": sorted((data / "coco_tiny" / "images" / "val2017").glob("*.jpg"))[::2],
    }


def drop_images(ref, names: set[str]):
    """The reference set without the rows whose source image is in ``names`` (the same rows a
    GT build without those photos gives, since GT mode embeds each photo on its own)."""
    from reme.reference import ReferenceSet

    keep = np.array([s not in names for s in ref.segment_image])
    new_id = np.cumsum(keep) - 1
    pk = keep[ref.pair_segment]
    return ReferenceSet(S_ref=np.asarray(ref.S_ref)[keep], L_ref=ref.L_ref, pair_segment=new_id[ref.pair_segment[pk]],
                        pair_label=ref.pair_label[pk], labels=ref.labels, roots=ref.roots,
                        segment_image=[s for s, k in zip(ref.segment_image, keep) if k],
                        segment_bbox=ref.segment_bbox[keep], segment_area=ref.segment_area[keep],
                        manifest=ref.manifest)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["feats", "neighbours"])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/none_cache"))
    ap.add_argument("--data", type=Path, default=shared_data_dir())
    ap.add_argument("--reference", type=Path, default=Path("reference_sets/default"))
    ap.add_argument("--tag", default="default")
    ap.add_argument("--splits", nargs="*", default=None)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--cached-only", action="store_true", help="skip images whose features are not cached")
    ap.add_argument("--drop-coco-train", action="store_true",
                    help="leave-out reference: the given one without its coco_tiny train rows")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from reme.inference.segmenter import Segmenter
    from reme.encoders.pooling import embed_proposals
    from reme.inference.retrieval import exact_topk
    from reme.io import load_image
    from reme.reference import load_reference

    lists = image_lists(args.data)
    ref = load_reference(args.reference)
    if args.drop_coco_train:
        ref = drop_images(ref, {p.name for p in (args.data / "coco_tiny" / "images" / "train2017").glob("*.jpg")})
    seg = Segmenter(ref, device="cpu")
    for split in args.splits or list(lists):
        out = args.cache / "feats" / split
        out.mkdir(parents=True, exist_ok=True)
        for p in lists[split]:
            f = out / (p.stem + ".pt")
            img = load_image(p)
            if args.cached_only and not f.exists():
                continue
            if f.exists():
                feats = torch.load(f).float()
            else:
                with torch.inference_mode():
                    feats = seg.visual_encoder.dense_features(img)
                torch.save(feats.half(), f)
            if args.stage == "feats":
                continue
            g = args.cache / args.tag / split / (p.stem + ".npz")
            if g.exists():
                continue
            g.parent.mkdir(parents=True, exist_ok=True)
            with torch.inference_mode():
                props = seg.proposer(img, feats)
                S = embed_proposals(seg.visual_encoder, feats, props, img)
                sims, ids = exact_topk(S, seg.predictor.S_ref, args.k)
            np.savez_compressed(g, segment_ids=props.segment_ids.astype(np.int32), S_test=S.numpy().astype(np.float16),
                                sims=sims.numpy(), ids=ids.numpy())
        print(split, "done", flush=True)


if __name__ == "__main__":
    main()
