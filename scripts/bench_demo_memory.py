"""Bytes the demo keeps per taught photo: one session teaches N distinct 800 x 800 photos
(chelsea resized and shifted) through the backend, and after each one prints
[`DemoBackend.memory`][reme.demo.backend.DemoBackend.memory] (overlay rows, thumbnails, kept
results) and the process RSS, with the load average:

    python scripts/bench_demo_memory.py --photos 6

Numbers measured with it: docs/inspecting.md ("Memory, bounded in bytes").
"""

from __future__ import annotations

import argparse
import os


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=6)
    ap.add_argument("--side", type=int, default=800)
    ap.add_argument("--classes", default="cat, wall, floor, rug")
    args = ap.parse_args(argv)

    import numpy as np
    from PIL import Image

    from reme.defaults import default_reference_path
    from reme.demo.backend import DemoBackend
    from reme.io import sample_image

    backend = DemoBackend({"default": default_reference_path()}, device="cpu")
    backend.segmenter("default")
    base = np.asarray(Image.fromarray(sample_image("chelsea")).resize((args.side, args.side)))
    session = "memory-session-0000-0123456789"
    print(f"load average {os.getloadavg()[0]:.2f}, rss {_rss_mb():.0f} MB, budget "
          f"{backend.memory()['budget'] / 2**20:.0f} MiB")
    for i in range(args.photos):
        img = np.roll(base, 37 * i, axis=1).copy()
        img[0, 0, 0] ^= i + 1                                     # distinct pixels: a new photo each time
        out = backend.segment(img, args.classes, session=session, image_name=f"p{i}.png")
        backend.add_example(session, out["result_id"], "rug", x=args.side - 100, y=args.side - 100, resegment=False)
        m = backend.memory()
        print(f"{i + 1} photos: rows {m['rows']} B, thumbs {m['thumbs']} B, results {m['results'] / 2**20:.1f} MiB "
              f"({len(backend._results)} kept), total {m['total'] / 2**20:.1f} MiB, rss {_rss_mb():.0f} MB")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
