"""Where a cold ``reme segment`` spends its time (issue 20): one fresh process, the steps of the
command in order, one JSON line of seconds per step on stdout.

    python scripts/cold_start_breakdown.py            # a 640 x 480 VOC sample, README's 8 classes

Steps: importing the CLI; importing the inference code (torch); loading the reference set
(memory maps, checksums); importing transformers' DINOv2 module; loading the DINOv2 weights;
building the ``Segmenter`` (MiniLM is loaded only if a class name is missing from the on-disk
label cache); the first ``predict``. Run it twice: the first run may fill the label cache.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

CLASSES = "person,cat,cup,table,sky,building,road,tree".split(",")


def main() -> None:
    t0 = time.perf_counter()
    laps: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        laps[name] = round(now - t0, 3)
        t0 = now

    import reme.cli  # noqa: F401
    lap("import_cli")
    from reme.cli.threads import apply_threads

    apply_threads()
    from reme.inference.segmenter import Segmenter
    lap("import_inference_torch")
    from reme.defaults import default_reference_path, shared_data_dir
    from reme.reference import load_reference

    ref = load_reference(default_reference_path())
    lap("load_reference")
    import transformers.models.dinov2.modeling_dinov2  # noqa: F401
    lap("import_transformers_dinov2")
    from reme.encoders import resolve_encoder

    visual = resolve_encoder(ref.manifest["encoders"]["visual"])
    lap("load_dinov2_weights")
    seg = Segmenter(ref, visual_encoder=visual)
    lap("segmenter_rest")
    from PIL import Image

    root = shared_data_dir()
    if root is None:
        raise SystemExit("shared/data not found (set REME_SHARED_DATA)")
    photo = sorted(p for p in (root / "voc_samples" / "images").iterdir() if p.suffix.lower() in (".jpg", ".png"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photo.jpg"
        Image.open(photo).convert("RGB").resize((640, 480)).save(path)
        lap("prepare_photo")
        seg.predict(str(path), CLASSES)
        lap("first_predict")
    laps["text_model_loaded"] = getattr(seg.text_encoder, "_model", True) is not None
    laps["load_avg"] = round(os.getloadavg()[0], 2)
    print(json.dumps(laps), flush=True)


if __name__ == "__main__":
    sys.exit(main())
