"""Locations of the bundled defaults (embedded reference set, sample photos)."""

from __future__ import annotations

import os
from pathlib import Path

#: The reference set shipped in the repository (built by scripts/build_default_reference.py).
DEFAULT_REFERENCE_NAME = "default"

# Defaults the command line shows in its help, here so that the CLI need not import torch to
# print them; the library modules that use them are named (tests/test_cli_defaults.py checks
# that they agree).
#: `reme.inference.segmenter.DEFAULT_MAX_WORKING_PIXELS`: 2 MP working resolution.
MAX_WORKING_PIXELS = 2048 * 1024
#: Felzenszwalb's working size at inference (`reme.inference.predictor.DEFAULT_PROPOSAL_PIXELS`):
#: 1/6 of the 448 x 597 input the DINOv2 encoder sees of a 4:3 photo, the best of full size and
#: 1/2, 1/4, 1/6, 1/8 of it on 82 CamVid train frames (docs/performance.md); None = full size.
PROPOSAL_PIXELS: int | None = 44_576
#: `reme.inference.segmenter.DEFAULT_SEGMENT_LOGIT_SCALE` / `DEFAULT_LABEL_LOGIT_SCALE` (tau1, tau2).
LOGIT_SCALE = 50.0
#: `reme.inference.segmenter.DEFAULT_TOP_K`.
TOP_K = 10
#: `reme.build._shard_stages.MAX_BUILD_PIXELS`: larger build images are downscaled or skipped.
MAX_BUILD_PIXELS = 4096 * 4096


def default_reference_path() -> Path:
    """``$REME_REFERENCE`` if set, else ``reference_sets/default`` of the source checkout.

    Raises:
        FileNotFoundError: neither exists; the message says how to get one.
    """
    env = os.environ.get("REME_REFERENCE")
    if env:
        return Path(env)
    path = Path(__file__).resolve().parents[1] / "reference_sets" / DEFAULT_REFERENCE_NAME
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(
            f"no default reference set at {path}; pass --reference REF (build one with "
            "`reme build-reference`) or set REME_REFERENCE"
        )
    return path


def shared_data_dir() -> Path | None:
    """The ``shared/data`` folder beside the checkout (``$REME_SHARED_DATA`` overrides), or None."""
    env = os.environ.get("REME_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None
