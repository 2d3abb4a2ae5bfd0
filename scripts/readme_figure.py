"""Render README command 1's expected output: the four scikit-image photos segmented with the
embedded default reference set and the README's classes, overlays tiled into one small PNG.

    python scripts/readme_figure.py [--out docs/img/quickstart_overlays.png] [--width 360]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from reme.io import load_image
from reme.inference.segmenter import Segmenter
from reme.report.viz import overlay

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]
CLASSES = "person,cat,cup,table,sky,building,road,tree"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "img" / "quickstart_overlays.png")
    ap.add_argument("--width", type=int, default=360, help="width of each tile in pixels")
    args = ap.parse_args()
    seg = Segmenter(Path(__file__).resolve().parents[1] / "reference_sets" / "default", device="cpu")
    tiles = []
    for name in PHOTOS:
        img = load_image(f"skimage:{name}")
        res = seg.predict(img, CLASSES)
        tile = overlay(img, res.label_map, res.classes, fractions=res.class_fractions)
        tiles.append(tile.resize((args.width, round(tile.height * args.width / tile.width)), Image.LANCZOS))
    rows = [tiles[:2], tiles[2:]]
    heights = [max(t.height for t in row) for row in rows]
    sheet = Image.new("RGB", (args.width * 2, sum(heights)), "white")
    for r, row in enumerate(rows):
        for c, t in enumerate(row):
            sheet.paste(t, (c * args.width, sum(heights[:r])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
