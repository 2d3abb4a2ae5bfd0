"""Print the numbers that docs/quickstart.md and docs/inspecting.md quote, from the commands they
name, so the pages can be checked (and updated) before a release.

    python scripts/docs_numbers.py            # about 1 minute on 2 CPU cores
    python scripts/docs_numbers.py --check    # exit 1 when a page no longer shows these numbers

It runs, on the embedded reference set (no benchmark data needed):

* ``reme segment skimage:astronaut --classes "person,sky,building,tree,road"`` (quickstart's
  example line);
* ``reme inspect`` (inspecting.md: groups, knee rank, largest groups) and copies its
  ``group_sizes.png`` to docs/img/inspect_group_sizes.png with ``--write-figure``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEGMENT = ["segment", "skimage:astronaut", "--classes", "person,sky,building,tree,road"]


def _reme(args: list[str], out: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "reme.cli", *args, "--out", str(out), "-q"], env=env,
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise SystemExit(f"reme {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def numbers(write_figure: bool = False) -> dict[str, str]:
    """The quoted lines, keyed by the page that quotes them."""
    with tempfile.TemporaryDirectory() as tmp:
        seg = _reme(SEGMENT, Path(tmp) / "seg")
        line = next(x for x in seg.splitlines() if x.startswith("skimage:astronaut:"))
        _reme(["inspect", "--max-groups", "0", "--thumbs", "1"], Path(tmp) / "inspect")
        s = json.loads((Path(tmp) / "inspect" / "summary.json").read_text())
        if write_figure:
            shutil.copy(Path(tmp) / "inspect" / "group_sizes.png", REPO / "docs" / "img" / "inspect_group_sizes.png")
    top = sorted(s["group_sizes"].items(), key=lambda kv: -kv[1])
    largest = ", ".join(f"{k} {v:,}" for k, v in top[:5])
    return {
        "docs/quickstart.md": line.strip(),
        "docs/inspecting.md": (f"{s['num_groups']} groups, knee at rank {s['knee_rank']}, "
                               f"{sum(s['dropped_by_reason'].values())} dropped pairs, "
                               f"{len(s['synonym_pairs'])} synonym pairs; largest: {largest}"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a page lacks its numbers")
    ap.add_argument("--write-figure", action="store_true", help="refresh docs/img/inspect_group_sizes.png")
    args = ap.parse_args()
    print("$ " + subprocess.list2cmdline(["reme", *SEGMENT]) + "   and   $ reme inspect")
    stale = []
    for page, text in numbers(args.write_figure).items():
        print(f"{page}: {text}")
        doc = (REPO / page).read_text()
        pieces = [text] if page.endswith("quickstart.md") else text.split("; largest: ")[0].split(", ")[:2]
        if not all(p in " ".join(doc.split()) for p in pieces):
            stale.append(page)
    if stale:
        print("stale: " + ", ".join(stale))
        if args.check:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
