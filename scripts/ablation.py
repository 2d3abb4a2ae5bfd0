"""Reproduce the ablation tables of docs/results.md offline (classical + MiniLM encoders).

    python scripts/ablation.py --out ablation_out [--data ../shared/data] \
        [--camvid-reference REF] [--noisy-limit 20] [--noisy-stride 5] [--noise 0.3] \
        [--caption-photos 50] [--caption-eval-limit 25] [--skip-caption] [--skip-noisy]

1. **Noisy-GT ablation** (meaningful offline): the CamVid train GT reference (built here with
   ``reme build-reference --masks`` settings unless ``--camvid-reference`` is given), 30 % of
   its labels replaced at random, then group filter off / fixed / adaptive, knee filter and
   synonyms, each evaluated on CamVid val (every ``--noisy-stride``-th image, at most
   ``--noisy-limit``), native resolution, whole image.
2. **Caption-mode ablation**: caption references of the coco_tiny train2017 photos with the
   human COCO captions, paired by a *random* tiny CLIP (``make_tiny_clip``: open_clip
   ViT, 2 layers, width 64, seed 0, saved as an open_clip ``local-dir`` folder), classical
   visual and MiniLM text encoders, evaluated on COCO-Object val. The pairing is random, so
   these numbers are near chance; they check the plumbing, not the method.

Both tables are printed and written (Markdown + JSON) under ``--out``. Same as
``reme ablate --kind noisy-gt|caption ...`` with these settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def make_tiny_clip(folder: Path, seed: int = 0) -> str:
    """A random-weight open_clip ViT saved as a ``clip:local-dir:`` folder; returns its spec."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "open_clip_pytorch_model.bin"
    if not ckpt.is_file():
        torch.manual_seed(seed)
        cfg_dir = folder / "_cfg"
        cfg_dir.mkdir(exist_ok=True)
        (cfg_dir / "ReMETinyRandom.json").write_text(json.dumps(TINY_CLIP_CFG))
        open_clip.add_model_config(cfg_dir)
        model = open_clip.create_model("ReMETinyRandom")
        (folder / "open_clip_config.json").write_text(json.dumps({
            "model_cfg": TINY_CLIP_CFG,
            "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
        }))
        torch.save(model.state_dict(), ckpt)
    return f"clip:local-dir:{folder.resolve()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--camvid-reference", type=Path, default=None)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noisy-limit", type=int, default=20)
    ap.add_argument("--noisy-stride", type=int, default=5)
    ap.add_argument("--caption-photos", type=int, default=50)
    ap.add_argument("--caption-eval-limit", type=int, default=25)
    ap.add_argument("--skip-noisy", action="store_true")
    ap.add_argument("--skip-caption", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from reme.eval import Protocol, open_dataset
    from reme.eval.ablation import ablate_caption, ablate_noisy_gt, ablation_table
    from reme.io import list_images
    from reme.reference import load_reference

    d = args.data
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_noisy:
        t0 = time.time()
        if args.camvid_reference:
            ref = load_reference(args.camvid_reference)
        else:
            from reme.build.annotations import MaskFolder, read_class_names
            from reme.build.pipeline import build_gt_reference
            from reme.encoders import resolve_encoder

            ref = build_gt_reference(d / "camvid/images/train",
                                     MaskFolder(d / "camvid/masks/train", read_class_names(d / "camvid/classes.txt")),
                                     resolve_encoder("classical"), resolve_encoder("minilm"))
        ds = open_dataset("generic", images=d / "camvid/images/val", masks=d / "camvid/masks/val",
                          classes_file=d / "camvid/classes.txt", stride=args.noisy_stride, limit=args.noisy_limit)
        rows = ablate_noisy_gt(ref, ds, Protocol(short_side=None), noise=args.noise, seed=args.seed,
                               out_dir=args.out / "noisy_gt")
        print(f"\nnoisy-GT ablation ({time.time() - t0:.0f} s): CamVid train GT reference, {args.noise:.0%} labels "
              f"replaced (seed {args.seed}); CamVid val {len(ds)} images (stride {args.noisy_stride}), native size")
        print(ablation_table(rows, "noisy-gt"))
    if not args.skip_caption:
        t0 = time.time()
        clip = make_tiny_clip(args.out / "tiny_clip")
        photos = d / "coco_tiny/images/train2017"
        keys = [p.relative_to(photos).as_posix() for p in list_images(photos)][: args.caption_photos]
        ds = open_dataset("coco_object", d / "coco_tiny", limit=args.caption_eval_limit)
        rows = ablate_caption(photos, f"captions:{d / 'captions/coco_captions.jsonl'}", clip, "classical", "minilm",
                              ds, images=keys, out_dir=args.out / "caption")
        print(f"\ncaption-mode ablation ({time.time() - t0:.0f} s): {len(keys)} coco_tiny train2017 photos, human "
              f"captions, RANDOM tiny CLIP pairing ({clip}), classical + MiniLM; COCO-Object val {len(ds)} images")
        print(ablation_table(rows, "caption"))


if __name__ == "__main__":
    main()
