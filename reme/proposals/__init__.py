"""Class-agnostic segment proposals (docs/method.md Part 1 step 1, Part 2 first line).

Felzenszwalb graph segmentation (``skimage.segmentation.felzenszwalb``) partitions the image;
a partition is stored as one (H, W) int32 *segment-id map* (ids 0..k-1), which is both the
compact form of the k boolean masks M_k and what eq. 3 gathers from. SAM masks overlap and are
kept as (k, H, W) bool masks ([`Proposals`][reme.proposals.Proposals]).
[`ProposalGenerator`][reme.proposals.ProposalGenerator] picks the method by name for the build and
for inference alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.segmentation import felzenszwalb, relabel_sequential

#: FreeDA settings per dataset style (docs/method.md step 1): (scale, sigma, min_size).
FELZENSZWALB_PRESETS: dict[str, tuple[float, float, int]] = {
    "default": (100.0, 1.0, 20),
    "voc": (100.0, 0.7, 20),
    "coco-stuff": (100.0, 1.0, 100),
    "cityscapes": (20.0, 0.5, 50),
}


@dataclass(frozen=True)
class FelzenszwalbParams:
    """Felzenszwalb settings; defaults are FreeDA's (scale 100, sigma 1.0, min_size 20)."""

    scale: float = 100.0
    sigma: float = 1.0
    min_size: int = 20

    @classmethod
    def preset(cls, name: str) -> "FelzenszwalbParams":
        """One of `FELZENSZWALB_PRESETS` (ValueError lists them when unknown)."""
        if name not in FELZENSZWALB_PRESETS:
            raise ValueError(f"unknown Felzenszwalb preset {name!r}; known: {sorted(FELZENSZWALB_PRESETS)}")
        return cls(*FELZENSZWALB_PRESETS[name])


#: Felzenszwalb's ``scale`` at a reduced working size is multiplied by (area factor) ** this:
#: on 10 CamVid train frames at half the side, exponent 0 / 0.15 / 0.25 / 0.5 / 1 gave median
#: 292 / 342 / 383 / 503 / 876 segments against 354 at full size; 0.15 is the closest
#: (scripts/bench_speed_options.py, docs/performance.md).
SCALE_AREA_EXPONENT: float = 0.15


def felzenszwalb_segments(image: np.ndarray, params: FelzenszwalbParams = FelzenszwalbParams(),
                          max_pixels: int | None = None) -> np.ndarray:
    """Felzenszwalb partition of an RGB image (Felzenszwalb & Huttenlocher, IJCV 2004).

    Args:
        image: (H, W, 3) uint8 RGB; converted to float in [0, 1] as docs/method.md step 1 asks.
        params: scale / sigma / min_size.
        max_pixels: None (default) segments at full size. Else an image over this many pixels
            is segmented at a size of about ``max_pixels`` (area factor a): ``min_size``
            times a, ``sigma`` times sqrt(a), ``scale`` times a ** `SCALE_AREA_EXPONENT`
            (chosen on CamVid train frames so that the segment count stays that of full size);
            the ids are brought back to (H, W) by nearest neighbour. Opt-in speed option,
            measured in docs/performance.md.

    Returns:
        (H, W) int32 segment-id map with ids 0..k-1, every id present.

    Raises:
        ValueError: ``image`` is not (H, W, 3); ``max_pixels`` < 1.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    h, w = image.shape[:2]
    if max_pixels is not None and int(max_pixels) < 1:
        raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
    if max_pixels is None or h * w <= int(max_pixels):
        seg = felzenszwalb(image.astype(np.float32) / 255.0, scale=params.scale, sigma=params.sigma,
                           min_size=params.min_size, channel_axis=-1)
        return _sequential(seg)
    from PIL import Image

    f = (int(max_pixels) / (h * w)) ** 0.5
    sh, sw = max(round(h * f), 1), max(round(w * f), 1)
    a = sh * sw / (h * w)
    small = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((sw, sh), Image.BILINEAR))
    seg = felzenszwalb(small.astype(np.float32) / 255.0, scale=params.scale * a ** SCALE_AREA_EXPONENT, sigma=params.sigma * a ** 0.5,
                       min_size=max(int(round(params.min_size * a)), 1), channel_axis=-1)
    rows = np.minimum((np.arange(h) * sh) // h, sh - 1)
    cols = np.minimum((np.arange(w) * sw) // w, sw - 1)
    return _sequential(seg[rows[:, None], cols[None, :]])


def _sequential(seg: np.ndarray) -> np.ndarray:
    """(H, W) int32 ids 0..k-1 in the order of the sorted values (skimage's relabel_sequential)."""
    return relabel_sequential(seg - seg.min())[0].astype(np.int32)


def masks_from_segment_ids(seg: np.ndarray) -> np.ndarray:
    """(H, W) int segment-id map -> (k, H, W) bool masks M_k (dense; for small k or tests)."""
    k = int(seg.max()) + 1 if seg.size else 0
    return seg[None, :, :] == np.arange(k, dtype=seg.dtype)[:, None, None]


def segment_bboxes(seg: np.ndarray) -> np.ndarray:
    """Bounding boxes of each segment of a segment-id map.

    Returns:
        (k, 4) int32 boxes in XYWH pixel units (x0, y0, width, height).
    """
    from scipy import ndimage

    k = int(seg.max()) + 1
    boxes = np.zeros((k, 4), np.int32)
    for i, sl in enumerate(ndimage.find_objects(seg + 1)):
        if sl is not None:
            ys, xs = sl
            boxes[i] = (xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start)
    return boxes


def masks_bboxes(masks: np.ndarray) -> np.ndarray:
    """(k, 4) int32 XYWH boxes of (k, H, W) bool masks (an empty mask gives zeros)."""
    boxes = np.zeros((len(masks), 4), np.int32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if ys.size:
            boxes[i] = (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    return boxes


@dataclass
class Proposals:
    """Class-agnostic proposals of one image.

    Attributes:
        segment_ids: (H, W) int32 map whose values index the k proposals; for overlapping
            masks, the smallest mask covering each pixel (larger masks painted first).
        masks: (k, H, W) bool masks when proposals may overlap (SAM), else None (a partition:
            ``segment_ids`` is the whole story).
    """

    segment_ids: np.ndarray
    masks: np.ndarray | None = None

    @property
    def num(self) -> int:
        """k, the number of proposals."""
        return len(self.masks) if self.masks is not None else int(self.segment_ids.max()) + 1

    def bboxes(self) -> np.ndarray:
        """(k, 4) int32 XYWH boxes."""
        return masks_bboxes(self.masks) if self.masks is not None else segment_bboxes(self.segment_ids)

    def areas(self) -> np.ndarray:
        """(k,) int64 areas in pixels (overlapping masks count shared pixels in each)."""
        if self.masks is not None:
            return self.masks.reshape(len(self.masks), -1).sum(1).astype(np.int64)
        return np.bincount(self.segment_ids.ravel(), minlength=self.num).astype(np.int64)


def proposal_label_counts(props: Proposals, label_map: np.ndarray, num_labels: int) -> np.ndarray:
    """(k, num_labels) int64 pixel counts of each label value inside each proposal.

    Args:
        props: the k proposals of an (H, W) image.
        label_map: (H, W) int map, values in [0, num_labels); pixels < 0 are not counted.
        num_labels: number of label values.
    """
    valid = label_map >= 0
    if props.masks is None:
        flat = props.segment_ids[valid].astype(np.int64) * num_labels + label_map[valid]
        return np.bincount(flat, minlength=props.num * num_labels).reshape(props.num, num_labels)
    return np.stack([np.bincount(label_map[m & valid], minlength=num_labels) for m in props.masks]).astype(np.int64)


def majority_pieces(props: Proposals, label_map: np.ndarray, num_labels: int,
                    min_purity: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The proposals a label map annotates: GT mode's segments (docs/method.md, GT mode) and the
    pieces of an added example ([`reme.reference.overlay`][reme.reference.overlay]).

    A proposal is kept when its majority label covers at least ``min_purity`` of its area.

    Args:
        props: the k proposals of an (H, W) image.
        label_map: (H, W) int map, values in [0, num_labels); pixels < 0 are unlabelled.
        num_labels: number of label values.
        min_purity: in (0, 1].

    Returns:
        ``(keep, label)``: (k,) bool and (k,) int64 majority label of each proposal.
    """
    counts = proposal_label_counts(props, label_map, num_labels)
    top = counts.max(1) if counts.size else np.zeros(props.num, np.int64)
    keep = (top >= min_purity * props.areas()) & (top > 0)
    return keep, (counts.argmax(1) if counts.size else np.zeros(props.num, np.int64))


#: Proposal methods of `ProposalGenerator` ("sam:MODEL" names a SAM checkpoint).
PROPOSAL_METHODS = ("felzenszwalb", "cluster", "sam")


def check_proposal_method(method: str) -> str:
    """Return ``method`` if it is ``"felzenszwalb"``, ``"cluster"``, ``"sam"`` or ``"sam:MODEL"``.

    Raises:
        ValueError: anything else.
    """
    family = method.partition(":")[0] if isinstance(method, str) else None
    if family not in PROPOSAL_METHODS or (family != "sam" and method != family):
        raise ValueError(f"proposals must be 'felzenszwalb', 'cluster', 'sam' or 'sam:MODEL', got {method!r}")
    return method


class ProposalGenerator:
    """Class-agnostic proposals by method name (docs/method.md step 1 and its options).

    Args:
        method: ``"felzenszwalb"`` (default; FreeDA settings), ``"cluster"`` (Split Matching's
            k-means over the visual encoder's dense features,
            [`reme.proposals.cluster`][reme.proposals.cluster]), or ``"sam"`` / ``"sam:MODEL"`` (SAM
            automatic masks, [`reme.proposals.sam`][reme.proposals.sam]; hub id or local folder,
            default facebook/sam-vit-huge; masks may overlap).
        felzenszwalb: Felzenszwalb settings (its ``min_size`` is also the smallest cluster
            region).
        n_clusters: k of ``"cluster"`` (our default 8).
        sam_options: keywords of
            [`reme.proposals.sam.SamProposals`][reme.proposals.sam.SamProposals]
            (``points_per_side`` 32, ``pred_iou_thresh`` 0.88, ``stability_score_thresh`` 0.95,
            ...).
        device: where SAM runs.
        max_pixels: Felzenszwalb at about this many pixels, ids upsampled (see
            [`felzenszwalb_segments`][reme.proposals.felzenszwalb_segments]); None = full size.

    Raises:
        ValueError: unknown method. reme.errors.MissingWeightsError: SAM weights missing.
    """

    def __init__(self, method: str = "felzenszwalb", *, felzenszwalb: FelzenszwalbParams = FelzenszwalbParams(),
                 n_clusters: int = 8, sam_options: dict | None = None, device=None,
                 max_pixels: int | None = None):
        check_proposal_method(method)
        if int(n_clusters) < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        self.method, self.felzenszwalb, self.n_clusters = method, felzenszwalb, int(n_clusters)
        if max_pixels is not None and int(max_pixels) < 1:
            raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        self.sam = None
        if method.startswith("sam"):
            from reme.proposals.sam import SamProposals

            self.sam = SamProposals(method[4:] or "facebook/sam-vit-huge", device=device, **(sam_options or {}))

    @property
    def settings_key(self) -> tuple:
        """What the proposals of an image depend on besides its pixels (method, Felzenszwalb
        settings, k of the clusters, working size): part of a cache key."""
        return (self.method, self.felzenszwalb, self.n_clusters, self.max_pixels)

    @property
    def overlapping(self) -> bool:
        """True when proposals may overlap (SAM)."""
        return self.sam is not None

    def __call__(self, image: np.ndarray, features=None) -> Proposals:
        """Proposals of one image.

        Args:
            image: (H, W, 3) uint8 RGB.
            features: (h, w, d) dense features of the image; needed by ``"cluster"``.

        Returns:
            [`Proposals`][reme.proposals.Proposals].
        """
        if self.method == "felzenszwalb":
            return Proposals(felzenszwalb_segments(image, self.felzenszwalb, self.max_pixels))
        if self.method == "cluster":
            if features is None:
                raise ValueError("cluster proposals need the image's dense features")
            from reme.proposals.cluster import cluster_segments

            return Proposals(cluster_segments(features, image.shape[:2], n_clusters=self.n_clusters,
                                              min_size=self.felzenszwalb.min_size))
        masks = self.sam.masks(image)                                   # (k, H, W), largest first
        seg = np.zeros(image.shape[:2], np.int32)
        for i, m in enumerate(masks):                                   # smaller masks painted on top
            seg[m] = i
        return Proposals(seg, masks)
