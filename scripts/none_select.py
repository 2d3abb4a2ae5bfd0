"""Choose and measure the "none of these" thresholds (issue 19) from the caches of
scripts/none_cache.py: t_none (eq. 2's none column) and s_min (weak visual support), with the
subset-query protocol of reme.eval.subset. Prints markdown tables.

    python scripts/none_select.py select --cache /tmp/none_cache          # train splits only
    python scripts/none_select.py report --cache /tmp/none_cache --t-none 0.6 --s-min 0.5
    python scripts/none_select.py closed --cache /tmp/none_cache --reference /work/refs/camvid_dino --tag camvid_dino
    python scripts/none_select.py bias --cache /tmp/none_cache              # per-label confusion
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reme.defaults import shared_data_dir
from reme.encoders import resolve_encoder
from reme.encoders.text import TEMPLATES, embed_labels
from reme.eval.subset import SubsetMeter
from reme.inference import unlabelled as nr
from reme.inference.retrieval import label_affinity, topk_label_affinity
from reme.reference.oref import o_ref_csr
from reme.reference import load_reference

TAU = 50.0
CAMVID_SUBSETS = {"4 objects": ["car", "pedestrian", "bicyclist", "signsymbol"],
                  "3 stuff": ["sky", "road", "tree"]}
COCO_SMALL = ["person", "car", "dog", "cat", "chair", "bus", "bird", "bottle"]
EXTRA_WORDS = ["water", "grass", "snow", "flag", "sand", "carpet"]


def read_names(path: Path) -> list[str]:
    return [x.strip() for x in path.read_text().splitlines() if x.strip()]


class Split:
    """Cached images of one split against one reference set: sparse A1 (top-10 softmax), the
    nearest-neighbour cosine, segment ids and the ground truth."""

    def __init__(self, cache: Path, tag: str, split: str, ref, mask_dir: Path, mask_suffix: str = ".png",
                 freq_alpha: float = 0.0):
        o_ref = o_ref_csr(ref.pair_segment, ref.pair_label, ref.num_segments, ref.num_labels)
        self.items = []
        from none_cache import image_lists  # noqa: E402  (scripts/)

        stems = [p.stem for p in image_lists(mask_dir.parents[2])[split]]
        missing = [t for t in stems if not (cache / tag / split / f"{t}.npz").exists()]
        if missing:
            print(f"note: {split}: {len(missing)} of {len(stems)} images not cached yet, left out")
        for f in [cache / tag / split / f"{t}.npz" for t in stems if t not in missing]:
            z = np.load(f)
            sims, ids = torch.as_tensor(z["sims"]), torch.as_tensor(z["ids"])
            A1 = topk_label_affinity(sims, ids, o_ref, logit_scale=TAU).to_dense()
            gt = np.array(Image.open(mask_dir / (f.stem + mask_suffix)))
            self.items.append((A1, sims[:, 0], z["segment_ids"], gt))

    def predict(self, A2: torch.Tensor, rule: nr.NoneRule, p_none=None, col_weight=None):
        """Per image the (H, W) label map (indices into the asked classes, -1 unlabelled)."""
        A2x = A2 if p_none is None else nr.with_none_column(A2, p_none)
        for A1, nearest, seg, gt in self.items:
            A = A1 if col_weight is None else A1 * col_weight
            P = A @ A2x
            none = None
            if p_none is not None:
                P, none = P[:, :-1], P[:, -1]
            P_ext, _ = nr.extend_scores(P, none, nearest, rule) if rule.active else (P, None)
            lab = nr.to_label_map(P_ext.argmax(1).numpy(), A2.shape[1])
            yield lab[seg], gt


def evaluate(split: Split, L_ref, L_test, asked_ids, num_classes, ignore, rule, col_weight=None) -> dict:
    A2 = label_affinity(L_ref, L_test, TAU)
    p_none = nr.none_share(L_ref, L_test, TAU, rule.label_threshold) if rule.label_threshold is not None else None
    meter = SubsetMeter(asked_ids, num_classes, ignore)
    for pred, gt in split.predict(A2, rule, p_none, col_weight):
        meter.update(gt, pred)
    return meter.scores()


def setup(args):
    data = args.data
    txt = resolve_encoder("minilm", device="cpu")
    embed = lambda names: torch.as_tensor(embed_labels(txt, names, TEMPLATES))  # noqa: E731
    cam_names = read_names(data / "camvid" / "classes.txt")
    coco_names = read_names(data / "coco_tiny" / "classes_coco_object.txt")
    return data, embed, cam_names, coco_names


def fmt(x) -> str:
    return "-" if x is None else f"{x:g}"


def cmd_select(args) -> None:
    data, embed, cam_names, coco_names = setup(args)
    ref = load_reference(args.reference)
    from none_cache import drop_images  # noqa: E402  (scripts/)
    coco_train = sorted(p.name for p in (data / "coco_tiny" / "images" / "train2017").glob("*.jpg"))
    ref_lo = drop_images(ref, set(coco_train))
    cam = Split(args.cache, "default", "camvid_train_out", ref, data / "camvid" / "masks" / "train")
    coco = Split(args.cache, "noctrain", "coco_train", ref_lo, data / "coco_tiny" / "masks" / "train2017")
    Lr = torch.as_tensor(ref.L_ref)
    queries = [("CamVid", cam, cam_names, name, sub, 255) for name, sub in
               list(CAMVID_SUBSETS.items()) + [("all 11", cam_names)]]
    queries += [("COCO", coco, coco_names, "80 things", coco_names[1:], 255),
                ("COCO", coco, coco_names, "8 things", COCO_SMALL, 255)]
    L = {q[3]: embed(q[4]) for q in queries}
    t_grid = [None] + args.t_grid
    s_grid = [None] + args.s_grid
    head = "| t_none | s_min | " + " | ".join(f"{d} {n}: mIoU / forced" for d, _, _, n, _, _ in queries) + " | mean mIoU |"
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    best = None
    for t, s in itertools.product(t_grid, s_grid):
        rule = nr.NoneRule(t, s)
        cells, mious = [], []
        for dname, split, names, qname, sub, ign in queries:
            r = evaluate(split, Lr, L[qname], [names.index(c) for c in sub], len(names), ign, rule)
            mious.append(r["asked_miou"])
            cells.append(f"{r['asked_miou']:.2f} / {r['forced_share']:.1f}" if qname != "all 11" else f"{r['asked_miou']:.2f} / -")
        mean = float(np.mean(mious))
        print(f"| {fmt(t)} | {fmt(s)} | " + " | ".join(cells) + f" | {mean:.2f} |", flush=True)
        if best is None or mean > best[0]:
            best = (mean, t, s)
    print(f"\nbest mean asked mIoU {best[0]:.2f} at t_none={best[1]}, s_min={best[2]}")


def cmd_report(args) -> None:
    data, embed, cam_names, coco_names = setup(args)
    ref = load_reference(args.reference)
    Lr = torch.as_tensor(ref.L_ref)
    cam = Split(args.cache, "default", "camvid_val", ref, data / "camvid" / "masks" / "val")
    coco = Split(args.cache, "default", "coco_val", ref, data / "coco_tiny" / "masks" / "val2017")
    rows = [("CamVid val", cam, cam_names, n, sub) for n, sub in
            list(CAMVID_SUBSETS.items()) + [("all 11", cam_names)]]
    rows += [("coco_tiny val", coco, coco_names, "80 things", coco_names[1:]),
             ("coco_tiny val", coco, coco_names, "8 things", COCO_SMALL)]
    print("| data | asked | rule | asked mIoU | forced share % | unlabelled % | asked IoU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dname, split, names, qname, sub in rows:
        for label, rule in (("off (paper eqs.)", nr.OFF), ("none of these", nr.NoneRule(args.t_none, args.s_min))):
            r = evaluate(split, Lr, embed(sub), [names.index(c) for c in sub], len(names), 255, rule)
            ious = ", ".join(f"{c} {v:.1f}" for c, v in zip(sub, r["asked_iou"])) if len(sub) <= 11 else ""
            print(f"| {dname} | {qname} | {label} | {r['asked_miou']:.2f} | {r['forced_share']:.1f} | "
                  f"{r['unlabelled_share']:.1f} | {ious} |", flush=True)


def cmd_closed(args) -> None:
    data, embed, cam_names, _ = setup(args)
    ref = load_reference(args.reference)
    Lr = torch.as_tensor(ref.L_ref)
    cam = Split(args.cache, args.tag, "camvid_val", ref, data / "camvid" / "masks" / "val")
    words = cam_names + EXTRA_WORDS
    print("| asked | rule | mIoU (11 classes) | pixels to the 6 extra words % | unlabelled % |")
    print("| --- | --- | --- | --- | --- |")
    for qname, q in (("11 CamVid classes", cam_names), ("11 + water, grass, snow, flag, sand, carpet", words)):
        for label, rule in (("off", nr.OFF), ("none of these", nr.NoneRule(args.t_none, args.s_min))):
            A2 = label_affinity(Lr, embed(q), TAU)
            p_none = nr.none_share(Lr, embed(q), TAU, rule.label_threshold) if rule.label_threshold is not None else None
            meter = SubsetMeter(list(range(11)), 11, 255)
            extra = total = 0
            for pred, gt in cam.predict(A2, rule, p_none):
                valid = gt != 255
                extra += int((pred[valid] >= 11).sum())
                total += int(valid.sum())
                meter.update(gt, np.where(pred >= 11, -1, pred))
            r = meter.scores()
            print(f"| {qname} | {label} | {r['asked_miou']:.2f} | {100 * extra / total:.2f} | {r['unlabelled_share']:.2f} |",
                  flush=True)


def cmd_bias(args) -> None:
    """Per reference label: segments whose A1 argmax is that label, and the share of their pixels
    whose ground truth is the class the label maps to; then a frequency-normalised A1
    (column j divided by (count_j / median count)^alpha), alpha chosen on train."""
    data, embed, cam_names, coco_names = setup(args)
    ref = load_reference(args.reference)
    Lr = torch.as_tensor(ref.L_ref)
    counts = nr.label_segment_counts(ref.pair_label, ref.num_labels).astype(np.float64)
    from none_cache import drop_images  # noqa: E402
    coco_train = sorted(p.name for p in (data / "coco_tiny" / "images" / "train2017").glob("*.jpg"))
    ref_lo = drop_images(ref, set(coco_train))
    counts_lo = nr.label_segment_counts(ref_lo.pair_label, ref_lo.num_labels).astype(np.float64)
    sets = {"train": [("CamVid", Split(args.cache, "default", "camvid_train_out", ref, data / "camvid" / "masks" / "train"),
                       cam_names, counts),
                      ("COCO", Split(args.cache, "noctrain", "coco_train", ref_lo, data / "coco_tiny" / "masks" / "train2017"),
                       coco_names, counts_lo)],
            "val": [("CamVid", Split(args.cache, "default", "camvid_val", ref, data / "camvid" / "masks" / "val"),
                     cam_names, counts),
                    ("COCO", Split(args.cache, "default", "coco_val", ref, data / "coco_tiny" / "masks" / "val2017"),
                     coco_names, counts)]}
    # per-label absorption (val, no correction): pixels won by each label, and their precision
    for dname, split, names, _ in sets["val"]:
        won = np.zeros(ref.num_labels)
        right = np.zeros(ref.num_labels)
        lab_of_label = label_affinity(Lr, embed(names), TAU).argmax(1).numpy()       # class each label feeds
        for A1, _, seg, gt in split.items:
            top = A1.argmax(1).numpy()[seg]
            valid = gt != 255
            np.add.at(won, top[valid], 1)
            np.add.at(right, top[valid], (lab_of_label[top] == gt)[valid])
        order = np.argsort(-won)[:8]
        print(f"\n{dname} val, embedded reference: labels winning the most pixels (A1 argmax)")
        print("| label | reference segments | pixels won % | of them right % |")
        print("| --- | --- | --- | --- |")
        for j in order:
            print(f"| {ref.labels[j]} | {int(counts[j])} | {100 * won[j] / won.sum():.1f} | {100 * right[j] / max(won[j], 1):.1f} |")
    print("\n| alpha | split | CamVid mIoU (11) | COCO mIoU (81, bg = class 'background') |")
    print("| --- | --- | --- | --- |")
    for alpha in args.alphas:
        for part in ("train", "val"):
            cells = []
            for dname, split, names, cnt in sets[part]:
                w = torch.as_tensor((np.maximum(cnt, 1) / np.median(cnt[cnt > 0])) ** -alpha, dtype=torch.float32)
                r = evaluate(split, Lr, embed(names), list(range(len(names))), len(names), 255, nr.OFF, col_weight=w)
                cells.append(f"{r['asked_miou']:.2f}")
            print(f"| {alpha:g} | {part} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["select", "report", "closed", "bias"])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/none_cache"))
    ap.add_argument("--data", type=Path, default=shared_data_dir())
    ap.add_argument("--reference", type=Path, default=Path(__file__).resolve().parents[1] / "reference_sets" / "default")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--t-grid", type=float, nargs="*", default=[0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8])
    ap.add_argument("--s-grid", type=float, nargs="*", default=[0.4, 0.45, 0.5, 0.55, 0.6])
    ap.add_argument("--t-none", type=float, default=nr.DEFAULT_NONE_THRESHOLD)
    ap.add_argument("--s-min", type=float, default=nr.DEFAULT_MIN_SUPPORT)
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.0, 0.25, 0.5, 1.0])
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"select": cmd_select, "report": cmd_report, "closed": cmd_closed, "bias": cmd_bias}[args.cmd](args)


if __name__ == "__main__":
    main()
