"""Benchmark a reference build on the shared COCO photos: throughput, peak memory, engines.

Builds with the offline encoders (classical visual, MiniLM text) and prints one JSON line:
images, wall seconds, images/s, CPU seconds, peak RSS of this process and of the largest
worker, load average, output folder.

* ``--mode caption`` (default): every shared COCO photo (coco_tiny train + val, coco128;
  228 in all) with captions: the human COCO captions for coco_tiny and, for coco128 (which has
  none), captions made from its YOLO class labels ("a person, a bicycle and a car.").
  Pairing uses a tiny *random* CLIP (built here from a seed, as tests/conftest.py does), so the
  pairs are meaningless; this measures the plumbing, not quality.
* ``--mode gt``: coco_tiny train2017 with its instance annotations.

    python scripts/bench_build.py --out /tmp/bench/w1 --workers 1
    python scripts/bench_build.py --out /tmp/bench/w2 --workers 2
    python scripts/bench_build.py --out /tmp/bench/q --subset quarter
    python scripts/bench_build.py --mode gt --out /tmp/bench/ray --workers 2 --engine ray

Compare two outputs byte for byte with ``--compare A B`` (every file but manifest.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

TINY_CLIP = "ReMEBenchTinyViT-T16"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def prepare(data: Path, root: Path) -> tuple[Path, Path]:
    """Image folder of symlinks (tiny_train/, tiny_val/, coco128/) and a caption file for it."""
    images = root / "images"
    caps = root / "captions.jsonl"
    if caps.is_file():
        return images, caps
    sources = {"tiny_train": data / "coco_tiny/images/train2017", "tiny_val": data / "coco_tiny/images/val2017",
               "coco128": data / "coco128/images"}
    for sub, src in sources.items():
        (images / sub).mkdir(parents=True, exist_ok=True)
        for p in sorted(src.glob("*.jpg")):
            if not (images / sub / p.name).exists():
                (images / sub / p.name).symlink_to(p)
    rows = []
    for line in (data / "captions/coco_captions.jsonl").read_text().splitlines():
        r = json.loads(line)
        split = "tiny_train" if "/train2017/" in r["image"] else "tiny_val"
        rows.append({"image": f"{split}/{Path(r['image']).name}", "captions": r["captions"]})
    names = (data / "coco128/classes_coco80.txt").read_text().split("\n")
    for p in sorted((images / "coco128").glob("*.jpg")):
        lab = data / "coco128/labels/train2017" / (p.stem + ".txt")
        if not lab.is_file():
            continue
        cls = list(dict.fromkeys(names[int(ln.split()[0])] for ln in lab.read_text().splitlines() if ln.strip()))
        text = ", ".join(f"a {c}" for c in cls[:-1]) + (f" and a {cls[-1]}" if len(cls) > 1 else f"a {cls[-1]}")
        rows.append({"image": f"coco128/{p.name}", "captions": [f"{text}."]})
    from reme.io import write_bytes_atomic

    write_bytes_atomic(caps, ("\n".join(json.dumps(r) for r in rows) + "\n").encode())
    return images, caps


def tiny_clip(root: Path) -> str:
    """Register and save a tiny random open_clip model; returns its spec."""
    import open_clip
    import torch

    cfg_dir = root / "clip_configs"
    from reme.io import atomic_path, write_bytes_atomic

    write_bytes_atomic(cfg_dir / f"{TINY_CLIP}.json", json.dumps(TINY_CLIP_CFG).encode())
    open_clip.add_model_config(cfg_dir)
    ckpt = root / "tiny_clip.pt"
    if not ckpt.is_file():
        torch.manual_seed(0)
        with atomic_path(ckpt, ".pt") as tmp:
            torch.save(open_clip.create_model(TINY_CLIP).state_dict(), tmp)
    return f"clip:{TINY_CLIP}:{ckpt}"


def same_files(a: Path, b: Path) -> dict:
    names = sorted(p.name for p in a.iterdir() if p.name != "manifest.json")
    other = sorted(p.name for p in b.iterdir() if p.name != "manifest.json")
    diff = [n for n in names if n not in other or (a / n).read_bytes() != (b / n).read_bytes()]
    return {"files": names, "identical": names == other and not diff, "differ": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/reme_bench_inputs"), help="prepared inputs")
    ap.add_argument("--out", type=Path, help="reference folder to write")
    ap.add_argument("--mode", choices=("caption", "gt"), default="caption")
    ap.add_argument("--subset", choices=("all", "quarter"), default="all")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--engine", choices=("local", "ray"), default="local")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"))
    args = ap.parse_args()
    if args.compare:
        print(json.dumps(same_files(*args.compare)))
        return
    logging.basicConfig(level=logging.WARNING)
    from reme.build.annotations import CocoInstances
    from reme.build.pipeline import CaptionBuildParams, build_caption_reference, build_gt_reference
    from reme.encoders import resolve_encoder

    vis = resolve_encoder("classical", device="cpu")
    txt = resolve_encoder("minilm", device="cpu")
    opts = dict(out=args.out, overwrite=True, workers=args.workers, engine=args.engine, progress=False,
                work_dir=args.work_dir)
    if args.engine == "ray":
        import ray

        ray.init(num_cpus=max(2, args.workers), include_dashboard=False, logging_level="warning")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    if args.mode == "caption":
        images, caps = prepare(args.data, args.work)
        keys = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg"))
        keys = keys[::4] if args.subset == "quarter" else keys
        cap = resolve_encoder(f"captions:{caps}", device="cpu")
        clip = resolve_encoder(tiny_clip(args.work), device="cpu")
        t0 = time.perf_counter()
        ref = build_caption_reference(images, cap, clip, vis, txt, params=CaptionBuildParams(), images=keys, **opts)
    else:
        root = args.data / "coco_tiny"
        ann = CocoInstances(root / "annotations/instances_train2017.json")
        keys = ann.keys()[::4] if args.subset == "quarter" else ann.keys()
        t0 = time.perf_counter()
        ref = build_gt_reference(root / "images/train2017", ann, vis, txt, images=keys, **opts)
    wall = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    b = ref.manifest["build"]
    print(json.dumps({
        "mode": args.mode, "subset": args.subset, "engine": args.engine, "workers": args.workers,
        "images": len(keys), "wall_s": round(wall, 1), "images_per_s": round(len(keys) / wall, 3),
        "per_image_stage_s": b["seconds_per_image_stages"], "global_stage_s": b["seconds_global_stages"],
        "cpu_s": round(me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, 1),
        "peak_rss_mb": round(me.ru_maxrss / 1024), "peak_rss_worker_mb": round(kids.ru_maxrss / 1024),
        "segments": ref.num_segments, "labels": ref.num_labels, "loadavg_before": load0[0],
        "loadavg_after": os.getloadavg()[0], "out": str(args.out),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
