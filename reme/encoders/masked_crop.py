"""Segment embeddings from the CLS token of masked crops (Split Matching's region embedding).

Spec: ``cls:CLIPSPEC``, e.g. ``cls:clip-vit-b-16`` or ``cls:clip:ViT-B-16:/models/b16.pt``.

For each segment, its bounding box is cropped from the image, the pixels outside the segment
are set to a fill value, and the crop goes through the CLIP image tower's standard (CLS)
embedding (``OpenCLIPEncoder.encode_image_global``). Split Matching embeds its k-means regions
this way; reme offers it for any proposals, in the build (S_ref) and at inference (S_test),
as an alternative to mask average pooling (docs/method.md step 6). The dense features of a
[`MaskedCropEncoder`][reme.encoders.masked_crop.MaskedCropEncoder] are the CLIP's own (MaskCLIP
patches), so clustering proposals still work.

Cost: one forward pass of the image tower per segment (batched), against one per image for
mask average pooling: with Felzenszwalb's hundreds of segments per photo it is far slower,
with k-means clusters (8-16 regions) it is cheap.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from reme.encoders.base import VisualEncoder

#: Grey value outside the segment in each crop (our choice; SM does not state one).
DEFAULT_FILL = 0


def masked_crops(image: np.ndarray, segments: np.ndarray, fill: int = DEFAULT_FILL) -> list[np.ndarray]:
    """Bounding-box crops of each segment with the pixels outside the segment set to ``fill``.

    Args:
        image: (H, W, 3) uint8.
        segments: (H, W) int segment-id map (ids 0..k-1; boxes from ``scipy.ndimage``, each
            segment compared only inside its box), or (k, H, W) bool masks that may overlap.
            An empty mask gives a 1 x 1 fill crop.
        fill: grey value in [0, 255].

    Returns:
        k arrays (h_i, w_i, 3) uint8.
    """
    from reme.proposals import masks_bboxes, segment_bboxes

    seg = np.asarray(segments)
    boxes = segment_bboxes(seg) if seg.ndim == 2 else masks_bboxes(seg)
    crops = []
    for i, (x, y, bw, bh) in enumerate(boxes):
        if bw == 0 or bh == 0:
            crops.append(np.full((1, 1, 3), fill, np.uint8))
            continue
        crop = image[y:y + bh, x:x + bw].copy()
        inside = seg[y:y + bh, x:x + bw] == i if seg.ndim == 2 else seg[i, y:y + bh, x:x + bw]
        crop[~inside] = fill
        crops.append(crop)
    return crops


def cls_region_embeddings(clip_model, image: np.ndarray, segment_ids: np.ndarray,
                          fill: int = DEFAULT_FILL) -> np.ndarray:
    """Region embeddings from CLS tokens of masked crops (Split Matching's form).

    Args:
        clip_model: an encoder with ``encode_image_global(list of (h, w, 3) uint8) -> (n, d)``
            (``reme.encoders.clip.OpenCLIPEncoder``).
        image: (H, W, 3) uint8.
        segment_ids: (H, W) int segment-id map (ids 0..k-1), or (k, H, W) bool masks.
        fill: grey value outside the region.

    Returns:
        (k, d) float32, L2-normalised.
    """
    emb = np.asarray(clip_model.encode_image_global(masked_crops(image, segment_ids, fill)), np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


class MaskedCropEncoder(VisualEncoder):
    """A CLIP whose segment embeddings are CLS embeddings of masked crops (module docstring).

    Args:
        clip: an ``OpenCLIPEncoder`` (needs ``dense_features`` and ``encode_image_global``).
        fill: grey value outside the segment in each crop.

    Raises:
        ValueError: ``clip`` has no ``encode_image_global``.
    """

    def __init__(self, clip, fill: int = DEFAULT_FILL):
        if not callable(getattr(clip, "encode_image_global", None)):
            raise ValueError(f"cls: needs a CLIP image tower, got {getattr(clip, 'spec', clip)!r}")
        self.clip = clip
        self.fill = int(fill)
        self.dim, self.device = clip.dim, clip.device
        self.spec = f"cls:{clip.spec}"

    def dense_features(self, image: np.ndarray) -> torch.Tensor:
        """The CLIP's dense (MaskCLIP) features, (h, w, dim); used by clustering proposals."""
        return self.clip.dense_features(image)

    def dense_features_batch(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        return self.clip.dense_features_batch(images)

    def _embed(self, image, masks, device) -> torch.Tensor:
        if image is None:
            raise ValueError("cls: segment embeddings need the image (pass image=...)")
        emb = cls_region_embeddings(self.clip, np.asarray(image), masks, self.fill)
        return torch.as_tensor(emb, device=device)   # always L2-normalised (CLIP convention)

    def segment_embeddings(self, features: torch.Tensor, seg: np.ndarray, normalize: bool = True,
                           image: np.ndarray | None = None) -> torch.Tensor:
        """(k, dim) float32 CLS embeddings of the k segments' masked crops of ``image``.

        Raises:
            ValueError: ``image`` is None.
        """
        return self._embed(image, seg, features.device)

    def mask_embeddings(self, features: torch.Tensor, masks: np.ndarray, normalize: bool = True,
                        image: np.ndarray | None = None) -> torch.Tensor:
        """Like `segment_embeddings` for (k, H, W) bool, possibly overlapping masks."""
        return self._embed(image, masks, features.device)


def load_masked_crop(target: str, *, device: torch.device, cache_dir: str | None = None, **kwargs) -> MaskedCropEncoder:
    """Loader for ``cls:CLIPSPEC``; the CLIP goes through
    [`reme.encoders.resolve_encoder`][reme.encoders.resolve_encoder] (same weight rules and
    errors)."""
    from reme.encoders.factory import resolve_encoder

    if not target:
        raise ValueError("spec 'cls:' needs a CLIP spec, e.g. 'cls:clip-vit-b-16'")
    return MaskedCropEncoder(resolve_encoder(target, device=device, **kwargs))
