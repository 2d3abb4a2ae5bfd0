"""Per-image latency breakdown of ``Segmenter`` on real photos (issue 5).

Stages, timed separately for each photo (median over photos, after one warm-up image):

* ``proposals``   Felzenszwalb partition (:func:`reme.proposals.felzenszwalb_segments`);
* ``encoder``     the visual encoder's dense forward pass (``dense_features``);
* ``pooling``     mask average pooling of the k proposals (:func:`reme.encoders.pooling.mask_average_pool`);
* ``retrieval``   eqs. 1-2: A2 for the class list (class text embeddings cached after the first
  image and A2 once per class list, as the Segmenter does) and P_seg with the Segmenter's retrieval path;
* ``aggregation`` eq. 3: argmax of P_seg gathered through the segment-id map, class fractions.
* ``a2_uncached`` / ``a2_cached`` (not part of the stages): A2 = softmax(tau2 L_ref L_test^T) for
  10 000 labels x 150 classes computed afresh (what every image paid before the Segmenter cached
  A2 per class list, issue 13) and the cache hit that replaces it; their difference is the
  per-image saving.

``overhead_over_encoder`` = (proposals + pooling + retrieval + aggregation) / encoder.

No pretrained DINOv2 weights exist on this machine, so ``--encoder dinov2-vitl14-random`` times
a DINOv2 ViT-L/14 with *random* weights (``transformers`` Dinov2Model, the released
architecture: same FLOPs and latency, meaningless features); ``classical`` is the weight-free
offline encoder. The reference set is synthetic (``--ref-size`` clustered float16 rows of the
encoder's dimension, memory-mapped like a saved set; 10 000 labels); the class list is
ADE20K's 150 classes (``shared/data/ade_samples``); photos are ADE/VOC/COCO samples resized to
``--size`` x ``--size``. The last line printed is one JSON object.

    python scripts/bench_segment.py [--encoder dinov2-vitl14-random] [--ref-size 100000] [--retrieval exact]

``--reference REF`` times a real reference set instead (its encoders, proposals and settings,
e.g. the embedded default on 640 x 480 photos with README's classes):

    python scripts/bench_segment.py --reference reference_sets/default --size 640x480 \
        --classes "person,cat,cup,table,sky,building,road,tree"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_retrieval import make_reference  # noqa: E402  (same synthetic generator)

from reme.defaults import shared_data_dir  # noqa: E402
from reme.encoders.pooling import mask_average_pool  # noqa: E402
from reme.proposals import felzenszwalb_segments  # noqa: E402
from reme.reference import ReferenceSet  # noqa: E402
from reme.inference.retrieval import label_affinity  # noqa: E402
from reme.inference.segmenter import Segmenter  # noqa: E402

STAGES = ("proposals", "encoder", "pooling", "retrieval", "aggregation")


def random_dinov2_vitl14(device: str = "cpu"):
    """DINOv2 ViT-L/14 architecture (facebook/dinov2-large config) with random weights."""
    from transformers import Dinov2Config, Dinov2Model

    from reme.encoders.dinov2 import DINOv2Encoder

    cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       patch_size=14, image_size=518, layerscale_value=1.0, mlp_ratio=4)
    torch.manual_seed(0)
    return DINOv2Encoder(Dinov2Model(cfg), spec="dinov2:random-vitl14", device=device)


def photos(size: tuple[int, int], limit: int) -> list[np.ndarray]:
    """Up to ``limit`` shared sample photos resized to ``size`` = (width, height)."""
    root = shared_data_dir()
    paths = []
    if root is not None:
        for sub in ("ade_samples/images", "voc_samples/images", "coco_tiny/images/val2017"):
            paths += sorted(p for p in (root / sub).rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    if not paths:
        from skimage import data

        return [np.asarray(Image.fromarray(data.astronaut()).resize(size))]
    out = []
    for p in paths[:limit]:
        out.append(np.asarray(Image.open(p).convert("RGB").resize(size, Image.BILINEAR)))
    return out


def class_names() -> list[str]:
    root = shared_data_dir()
    f = root / "ade_samples" / "classes_ade150.txt" if root else None
    if f is not None and f.is_file():
        return [line.split(",")[0].strip() for line in f.read_text().splitlines() if line.strip()]
    return [f"class {i}" for i in range(150)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="dinov2-vitl14-random", choices=["dinov2-vitl14-random", "classical"])
    ap.add_argument("--ref-size", type=int, default=100_000)
    ap.add_argument("--retrieval", default="exact", choices=["exact", "topk"])
    ap.add_argument("--top-k", type=int, default=10, help="Segmenter top_k (0 = full softmax)")
    ap.add_argument("--size", default="512", help="photo size: S (S x S) or WxH")
    ap.add_argument("--reference", default=None, help="time this reference set (its encoders) instead of a synthetic one")
    ap.add_argument("--classes", default=None, help="comma-separated class list (default: ADE20K's 150)")
    ap.add_argument("--images", type=int, default=4)
    args = ap.parse_args()
    from reme.encoders import resolve_encoder

    work = None
    if args.reference:
        seg = Segmenter(args.reference, device="cpu", top_k=args.top_k or None, retrieval=args.retrieval)
        vis, n_labels = seg.visual_encoder, seg.reference.num_labels
        args.ref_size = seg.reference.num_segments
    else:
        vis = random_dinov2_vitl14() if args.encoder != "classical" else resolve_encoder("classical", device="cpu")
        txt = resolve_encoder("minilm", device="cpu")
        work = Path(tempfile.mkdtemp(prefix="reme-bench-seg-"))
        n_labels = 10_000
        _, ps, pl = make_reference(work / "S_ref.npy", args.ref_size, vis.dim, n_labels, seed=0)
        S_ref = np.load(work / "S_ref.npy", mmap_mode="r")
        rng = np.random.default_rng(0)
        L = rng.standard_normal((n_labels, txt.dim), dtype=np.float32)
        m = args.ref_size
        ref = ReferenceSet(S_ref=S_ref, L_ref=L / np.linalg.norm(L, axis=1, keepdims=True), pair_segment=ps, pair_label=pl,
                           labels=[f"label {j}" for j in range(n_labels)], roots=[f"root {j}" for j in range(n_labels)],
                           segment_image=[""] * m, segment_bbox=np.zeros((m, 4), np.int32), segment_area=np.ones(m, np.int64),
                           manifest={"encoders": {"visual": vis.spec, "text": txt.spec}})
        seg = Segmenter(ref, visual_encoder=vis, text_encoder=txt, device="cpu", top_k=args.top_k or None,
                        retrieval=args.retrieval)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else class_names()
    w, _, h = args.size.partition("x")
    imgs = photos((int(w), int(h or w)), args.images + 1)
    rows = []
    with torch.inference_mode():
        for i, img in enumerate(imgs):
            t = {}
            t0 = time.perf_counter()
            ids = felzenszwalb_segments(img, seg.felzenszwalb)
            t1 = time.perf_counter()
            feats = seg.visual_encoder.dense_features(img)
            t2 = time.perf_counter()
            S_test = mask_average_pool(feats, ids)
            t3 = time.perf_counter()
            A2, _ = seg.predictor.class_affinity([[c] for c in classes])            # cached per class list
            P, _ = seg.predictor.class_scores(S_test, A2)
            t4 = time.perf_counter()
            label_map = P.argmax(dim=1).numpy().astype(np.int32)[ids]                  # eq. 3 argmax
            np.bincount(label_map.ravel(), minlength=len(classes))
            t5 = time.perf_counter()
            L_test, _ = seg.predictor.class_embeddings([[c] for c in classes])
            ta = time.perf_counter()
            label_affinity(seg.predictor.L_ref, L_test, seg.label_logit_scale)                    # what each image paid before
            a2_uncached = time.perf_counter() - ta
            ta = time.perf_counter()
            seg.predictor.class_affinity([[c] for c in classes])                        # the cache hit it pays now
            a2_cached = time.perf_counter() - ta
            t.update(proposals=t1 - t0, encoder=t2 - t1, pooling=t3 - t2, retrieval=t4 - t3, aggregation=t5 - t4,
                     a2_uncached=a2_uncached, a2_cached=a2_cached)
            print(f"image {i}: {img.shape[1]}x{img.shape[0]}, k={int(ids.max()) + 1} segments: "
                  + ", ".join(f"{s} {1e3 * t[s]:.0f} ms" for s in STAGES) + (" (warm-up)" if i == 0 else ""), flush=True)
            if i:
                rows.append({**t, "k": int(ids.max()) + 1})
    med = {s: float(np.median([r[s] for r in rows])) for s in STAGES}
    overhead = sum(med[s] for s in STAGES if s != "encoder") / med["encoder"]
    t0 = time.perf_counter()
    seg.predict(imgs[-1], classes)
    e2e = time.perf_counter() - t0
    if work is not None:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    a2 = {f"a2_{x}_ms": round(1e3 * float(np.median([r[f"a2_{x}"] for r in rows])), 2) for x in ("uncached", "cached")}
    print(json.dumps({**{f"{s}_ms": round(1e3 * med[s], 1) for s in STAGES}, **a2, "labels": n_labels,
                      "overhead_over_encoder": round(overhead, 3), "predict_ms": round(1e3 * e2e, 1),
                      "segments_median": int(np.median([r["k"] for r in rows])), "image_size": args.size,
                      "classes": len(classes), "encoder": vis.spec, "ref_size": args.ref_size,
                      "retrieval": args.retrieval, "top_k": args.top_k or None, "images": len(rows),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
