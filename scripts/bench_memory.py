"""Peak memory of ``reme segment`` against the input size (issue 14).

Writes JPEGs of 1, 12 and 80 megapixels (scikit-image's ``astronaut`` photo upscaled with
Pillow, quality 90) to a temporary folder, then runs ``reme segment`` on each in its own
subprocess with the embedded default reference set and reads the child's peak resident set
size (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, kB on Linux; each size runs in a fresh
``python -c`` parent so the counter holds that run only). Prints one table row per size --
megapixels, peak RSS in MB, MB per megapixel, wall seconds, working size -- and then one JSON
object.

With the default ``--max-working-pixels`` (2 MP) the peak stays flat past the working size;
``--max-working-pixels 0`` shows the old full-resolution behaviour (about 300 bytes per pixel:
do not run it at 80 MP on a small machine).

    python scripts/bench_memory.py [--sizes 1,12,80] [--max-working-pixels 2097152] [--keep DIR]
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

_CHILD = """
import resource, subprocess, sys, json
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": proc.returncode, "peak_kb": peak_kb, "stderr": proc.stderr[-2000:]}))
"""


def make_jpeg(path: Path, megapixels: float) -> tuple[int, int]:
    """Write ``astronaut`` upscaled (bilinear) to about ``megapixels`` MP at 4:3; returns (H, W)."""
    import skimage.data

    w = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    h = int(round(w * 3 / 4))
    src = Image.fromarray(skimage.data.astronaut())
    src.resize((w, h), Image.BILINEAR).save(path, quality=90)
    return h, w


def measure(image: Path, out: Path, classes: str, max_working_pixels: int) -> dict:
    """Peak RSS (MB) and wall time of one ``reme segment`` subprocess."""
    cmd = [sys.executable, "-m", "reme.cli", "segment", str(image), "--classes", classes, "--out", str(out),
           "--max-working-pixels", str(max_working_pixels), "--quiet"]
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", _CHILD, *cmd], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    secs = time.time() - t0
    info = json.loads(res.stdout.strip().splitlines()[-1])
    if info["rc"] != 0:
        raise SystemExit(f"reme segment failed on {image} (rc {info['rc']}):\n{info['stderr']}")
    scores = json.loads((out / f"{image.stem}_scores.json").read_text())
    return {"peak_mb": info["peak_kb"] / 1024, "seconds": secs, "working_size": scores.get("working_size")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,12,80", help="Megapixels, comma-separated.")
    ap.add_argument("--max-working-pixels", type=int, default=2048 * 1024, help="Passed to reme segment (0 = off).")
    ap.add_argument("--classes", default="person,flag,sky,wall,floor,table")
    ap.add_argument("--keep", type=Path, default=None, help="Write the JPEGs and outputs here instead of a temp dir.")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="reme-bench-memory-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(f"{'MP':>6} {'H x W':>13} {'peak RSS MB':>12} {'MB/MP':>8} {'seconds':>8}  working size")
        for mp in (float(x) for x in args.sizes.split(",")):
            img = root / f"photo_{mp:g}mp.jpg"
            h, w = make_jpeg(img, mp)
            r = measure(img, root / "out", args.classes, args.max_working_pixels)
            mpx = h * w / 1e6
            row = {"megapixels": round(mpx, 2), "height": h, "width": w, "peak_rss_mb": round(r["peak_mb"], 1),
                   "mb_per_megapixel": round(r["peak_mb"] / mpx, 1), "seconds": round(r["seconds"], 1),
                   "working_size": r["working_size"]}
            rows.append(row)
            print(f"{mpx:6.1f} {f'{h} x {w}':>13} {row['peak_rss_mb']:12.0f} {row['mb_per_megapixel']:8.1f} "
                  f"{row['seconds']:8.1f}  {row['working_size']}", flush=True)
            img.unlink()
    print(json.dumps({"max_working_pixels": args.max_working_pixels, "rows": rows}))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
