"""Class-agnostic segment proposals (METHOD.md Part 1 step 1, Part 2 first line).

Felzenszwalb graph segmentation (``skimage.segmentation.felzenszwalb``) partitions the image;
a partition is stored as one (H, W) int32 *segment-id map* (ids 0..k-1), which is both the
compact form of the k boolean masks M_k and what eq. 3 gathers from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.segmentation import felzenszwalb

#: FreeDA settings per dataset style (METHOD.md step 1): (scale, sigma, min_size).
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
        """One of :data:`FELZENSZWALB_PRESETS` (ValueError lists them when unknown)."""
        if name not in FELZENSZWALB_PRESETS:
            raise ValueError(f"unknown Felzenszwalb preset {name!r}; known: {sorted(FELZENSZWALB_PRESETS)}")
        return cls(*FELZENSZWALB_PRESETS[name])


def felzenszwalb_segments(image: np.ndarray, params: FelzenszwalbParams = FelzenszwalbParams()) -> np.ndarray:
    """Felzenszwalb partition of an RGB image (Felzenszwalb & Huttenlocher, IJCV 2004).

    Args:
        image: (H, W, 3) uint8 RGB; converted to float in [0, 1] as METHOD.md step 1 asks.
        params: scale / sigma / min_size.

    Returns:
        (H, W) int32 segment-id map with ids 0..k-1, every id present.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    seg = felzenszwalb(image.astype(np.float32) / 255.0, scale=params.scale, sigma=params.sigma,
                       min_size=params.min_size, channel_axis=-1)
    return relabel_sequential(seg)


def relabel_sequential(seg: np.ndarray) -> np.ndarray:
    """Map the values of an integer label map to 0..k-1 (order of first value); (H, W) int32."""
    _, inv = np.unique(seg, return_inverse=True)
    return inv.reshape(seg.shape).astype(np.int32)


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
