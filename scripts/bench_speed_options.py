"""Quality and time of two opt-in speed options on CamVid (issue 20, docs/performance.md).

``precision``: the visual encoder in fp32 and in a reduced precision (``,precision=bf16`` or
fp16): feature cosine to fp32 (per patch token: mean, min), encoder seconds per frame, and
mIoU of ``Segmenter.predict`` with each, on the first ``--frames`` val frames.

``proposals``: Felzenszwalb at full size vs at ``--max-pixels`` values (parameters scaled,
ids upsampled; ``reme.proposals.felzenszwalb_segments``): proposal seconds and k per frame,
the *oracle* mIoU of the proposals (every proposal takes its majority ground-truth label: no
reference needed, so it can be measured on train frames, where the setting is chosen) and,
with ``--reference``, the mIoU of ``Segmenter.predict`` (on val frames).

    python scripts/bench_speed_options.py precision --reference /work/refs/camvid_dino --frames 20
    python scripts/bench_speed_options.py proposals --split train --frames 20
    python scripts/bench_speed_options.py proposals --split val --frames 20 --reference /work/refs/camvid_dino

One JSON line per variant on stdout; the thread count follows ``reme.cli.threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def data_root() -> Path:
    """shared/data as `reme.defaults.shared_data_dir` finds it, else /work/shared/data."""
    from reme.defaults import shared_data_dir

    return shared_data_dir() or Path("/work/shared/data")


def frames(split: str, n: int, exclude: set[str] = frozenset()) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``n`` CamVid frames of ``split`` (sorted by name) whose names are not in ``exclude``."""
    root = data_root()
    paths = [p for p in sorted((root / "camvid" / "images" / split).glob("*.png")) if p.name not in exclude][:n]
    return [(np.asarray(Image.open(p).convert("RGB")), np.asarray(Image.open(root / "camvid" / "masks" / split / p.name)))
            for p in paths]


def coco_frames(n: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
    """The first ``n`` coco_tiny **train** photos with masks of the 80 thing classes (background
    and unannotated pixels ignored: value 255), and those 80 names."""
    root = data_root() / "coco_tiny"
    names = [line.strip() for line in (root / "classes_coco_object.txt").read_text().splitlines() if line.strip()]
    out = []
    for p in sorted((root / "images" / "train2017").glob("*.jpg"))[:n]:
        gt = np.asarray(Image.open(root / "masks" / "train2017" / (p.stem + ".png"))).astype(np.int64)
        gt = np.where((gt >= 1) & (gt <= 80), gt - 1, 255)
        out.append((np.asarray(Image.open(p).convert("RGB")), gt))
    return out, names[1:81]


def class_file() -> list[str]:
    root = data_root()
    return [line.strip() for line in (root / "camvid" / "classes.txt").read_text().splitlines() if line.strip()]


def miou(pairs, num_classes: int) -> float:
    from reme.eval.metrics import confusion_matrix, scores_from_confusion

    cm = sum(confusion_matrix(gt, pred, num_classes) for gt, pred in pairs)
    return float(scores_from_confusion(cm)["miou"])


def pixel_accuracy(pairs, num_classes: int) -> float:
    from reme.eval.metrics import confusion_matrix, scores_from_confusion

    cm = sum(confusion_matrix(gt, pred, num_classes) for gt, pred in pairs)
    return float(scores_from_confusion(cm)["pixel_acc"])


def run_precision(args, data, classes) -> None:
    """One predict per frame and variant (variants interleaved); the encoder's output and time
    are taken from inside it. Running rows on stderr."""
    import torch

    from reme.inference.segmenter import Segmenter

    base = Segmenter(args.reference, device="cpu", view_cache_size=0)
    spec = base.visual_encoder.spec
    variants = {"fp32": base}
    for p in args.precisions.split(","):
        variants[p] = Segmenter(args.reference, device="cpu", view_cache_size=0, text_encoder=base.text_encoder,
                                visual_encoder=f"{spec},precision={p}")
    seen: dict = {}
    for name, seg in variants.items():
        def recorded(image, inner=seg.visual_encoder.dense_features, name=name):
            t0 = time.perf_counter()
            out = inner(image)
            seen[name] = (time.perf_counter() - t0, out.reshape(-1, out.shape[-1]))
            return out

        seg.visual_encoder.dense_features = recorded
    cos = {n: [] for n in variants}
    enc_s = {n: [] for n in variants}
    pairs = {n: [] for n in variants}
    rows = {}
    for img, gt in data:  # variants interleaved per frame: partial runs stay comparable
        for name, seg in variants.items():
            pairs[name].append((gt, seg.predict(img, classes).label_map))
            enc_s[name].append(seen[name][0])
            cos[name].append(torch.nn.functional.cosine_similarity(seen[name][1], seen["fp32"][1], dim=1))
            c = torch.cat(cos[name])
            rows[name] = {"variant": name, "encoder_s_median": round(float(np.median(enc_s[name])), 3),
                          "cosine_mean": round(float(c.mean()), 6), "cosine_min": round(float(c.min()), 6),
                          "miou": round(miou(pairs[name], len(classes)), 2), "frames": len(pairs[name]),
                          "load_avg": round(os.getloadavg()[0], 2)}
            print(json.dumps(rows[name]), file=sys.stderr, flush=True)
    for row in rows.values():
        print(json.dumps(row), flush=True)


def _memo_last(fn):
    """``fn`` remembering its last input's result: the proposal variants of one frame share the
    encoder's features (they do not depend on the proposals), so each frame is encoded once."""
    last: dict = {}

    def memo(image):
        key = (image.shape, hash(image.tobytes()))
        if last.get("key") != key:
            last.update(key=key, out=fn(image))
        return last["out"]

    return memo


def reference_images(reference: str) -> set[str]:
    """File names of the photos a reference set was built from (``segments.parquet``)."""
    import pyarrow.parquet as pq

    return {Path(n).name for n in pq.read_table(Path(reference) / "segments.parquet", columns=["image"])
            .column("image").to_pylist()}


def run_proposals(args, data, classes) -> None:
    from reme.proposals import FelzenszwalbParams, Proposals, felzenszwalb_segments, proposal_label_counts

    seg = None
    if args.reference:
        from reme.inference.segmenter import Segmenter

        ref = args.reference
        if args.dataset == "coco":  # leave-out: the reference without the coco_tiny train photos it holds
            sys.path.insert(0, str(Path(__file__).parent))
            from none_cache import drop_images

            from reme.reference import load_reference

            ref = drop_images(load_reference(ref), {p.name for p in (data_root() / "coco_tiny/images/train2017").glob("*.jpg")})
        seg = Segmenter(ref, device="cpu", view_cache_size=0, unlabelled=False)  # the closed set
        seg.visual_encoder.dense_features = _memo_last(seg.visual_encoder.dense_features)
    params = seg.felzenszwalb if seg is not None else FelzenszwalbParams()
    settings = [None] + [int(v) for v in args.max_pixels.split(",")]
    times, ks, oracle, pred = ({mp: [] for mp in settings} for _ in range(4))
    for img, gt in data:  # settings interleaved per frame: partial runs stay comparable
        for mp in settings:
            t0 = time.perf_counter()
            ids = felzenszwalb_segments(img, params, mp)
            times[mp].append(time.perf_counter() - t0)
            ks[mp].append(int(ids.max()) + 1)
            valid = np.where(gt < len(classes), gt, len(classes))  # void -> an extra column
            counts = proposal_label_counts(Proposals(ids), valid, len(classes) + 1)[:, : len(classes)]
            oracle[mp].append((gt, counts.argmax(axis=1)[ids]))
            if seg is not None:
                seg.proposer.max_pixels = mp
                pred[mp].append((gt, seg.predict(img, classes).label_map))
                print(f"max_pixels {mp}: {len(pred[mp])} frames, mIoU so far {miou(pred[mp], len(classes)):.2f}",
                      file=sys.stderr, flush=True)
    for mp in settings:
        row = {"max_pixels": mp, "proposals_s_median": round(float(np.median(times[mp])), 3),
               "k_median": int(np.median(ks[mp])), "oracle_miou": round(miou(oracle[mp], len(classes)), 2),
               "split": "coco_tiny train2017" if args.dataset == "coco" else args.split, "frames": len(data), "load_avg": round(os.getloadavg()[0], 2)}
        if seg is not None:
            row["miou"] = round(miou(pred[mp], len(classes)), 2)
            row["pixel_acc"] = round(pixel_accuracy(pred[mp], len(classes)), 2)
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["precision", "proposals"])
    ap.add_argument("--reference", default=None)
    ap.add_argument("--split", default="val", choices=["train", "val"])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--precisions", default="bf16")
    ap.add_argument("--dataset", default="camvid", choices=["camvid", "coco"],
                    help="coco (proposals mode): coco_tiny train photos, the 80 things, the reference without them")
    ap.add_argument("--outside", default=None, metavar="REFERENCE",
                    help="only frames this reference set was not built from (choosing a default on train frames "
                         "with the embedded reference: --split train --outside reference_sets/default)")
    ap.add_argument("--max-pixels", default="86400,43200,21600",
                    help="comma-separated; CamVid frames here are 480 x 360 = 172800 pixels, so these are "
                         "1/2, 1/4 (half the side) and 1/8 of a frame")
    args = ap.parse_args()
    from reme.cli.threads import apply_threads

    apply_threads()
    if args.dataset == "coco":
        data, classes = coco_frames(args.frames)
    else:
        data = frames(args.split, args.frames, reference_images(args.outside) if args.outside else set())
        classes = class_file()
    if args.what == "precision":
        if not args.reference:
            ap.error("precision needs --reference")
        run_precision(args, data, classes)
    else:
        run_proposals(args, data, classes)


if __name__ == "__main__":
    main()
