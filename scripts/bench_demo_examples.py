"""Latency of the demo's teach-by-example flow, from "Label this" to the refreshed overlay.

Uses the demo's framework-free backend ([`reme.demo.backend.DemoBackend`]) with a reference set
(default: the embedded one, its real visual encoder) on one of scikit-image's photos, exactly
as the page's requests do. Each repetition is a new browser session on a photo whose features
are not cached, and times:

- ``segment``: the first segmentation (encoder pass, proposals, retrieval, overlay PNG);
- ``add``: adding the clicked segment as an example (features reused from the segmentation);
- ``resegment``: segmenting the same photo again with the example (what the page shows next);
- ``label_this``: add + re-segment, one POST /api/examples (the user's wait, less HTTP);
- ``undo``: removing the example and segmenting again (one POST /api/examples/undo).

Prints each repetition and the median of ``--repeats`` (default 5), with the load average:

    python scripts/bench_demo_examples.py --photo chelsea --classes "cat, wall, floor, rug" --repeats 5

Numbers measured with it: docs/inspecting.md ("Teach it by example").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default=None, help="reference set folder (default: the embedded one)")
    ap.add_argument("--photo", default="chelsea", help="a bundled scikit-image photo (reme.io.SAMPLE_PHOTOS)")
    ap.add_argument("--classes", default="cat, wall, floor, rug")
    ap.add_argument("--label", default="rug", help="label taught to the clicked segment")
    ap.add_argument("--x", type=float, default=0.89, help="clicked pixel, as a fraction of the width")
    ap.add_argument("--y", type=float, default=0.93, help="clicked pixel, as a fraction of the height")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import torch

    from reme.defaults import default_reference_path
    from reme.demo.backend import DemoBackend

    ref = Path(args.reference) if args.reference else default_reference_path()
    t0 = time.perf_counter()
    backend = DemoBackend({"default": ref}, device=args.device)
    backend.segmenter("default")
    load_s = time.perf_counter() - t0
    image = backend.sample(args.photo)
    print(f"reference {ref} ({backend.segmenter('default').reference.num_segments} segments), "
          f"photo {args.photo} {image.shape[1]}x{image.shape[0]}, classes {args.classes!r}, label {args.label!r}")
    print(f"cpu cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}; reference loaded in {load_s:.1f} s")
    rows = []
    for i in range(args.repeats):
        session = f"bench-session-{i:04d}-0123456789"
        photo = image.copy()
        photo[0, 0, 0] ^= 1 + i                      # pixels not seen before: no cached features
        t = time.perf_counter()
        first = backend.segment(photo, args.classes, session=session, image_name=args.photo)
        seg_s = time.perf_counter() - t
        x, y = int(args.x * first["width"]), int(args.y * first["height"])
        t = time.perf_counter()
        added = backend.add_example(session, first["result_id"], args.label, x=x, y=y)
        label_s = time.perf_counter() - t
        t = time.perf_counter()
        undone = backend.undo_example(session, added["example_id"], result_id=added["result"]["result_id"])
        undo_s = time.perf_counter() - t
        if undone["result"]["overlay"] != first["overlay"]:
            print("warning: the overlay after undo differs from the first one", file=sys.stderr)
        row = {"segment": seg_s, "add": added["seconds"]["add"], "resegment": added["seconds"]["segment"],
               "label_this": label_s, "undo": undo_s}
        rows.append(row)
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.3f} s" for k, v in row.items())
              + f"; taught {added['examples'][0]['rows']} segment(s)")
    print(f"median of {len(rows)}: " + ", ".join(f"{k} {statistics.median(r[k] for r in rows):.3f} s" for k in rows[0]))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
