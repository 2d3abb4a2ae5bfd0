"""SAM automatic-mask proposals (docs/method.md step 1 option).

Segment Anything's automatic mask generator prompts the model with a regular point grid
(32 x 32 in the paper's setting) and keeps the masks that pass its predicted-IoU and
stability thresholds. reme runs it through ``transformers``' ``mask-generation`` pipeline
(``SamModel``), with weights from a hub id (``facebook/sam-vit-huge``, ``facebook/sam-vit-base``)
or a local ``save_pretrained`` folder; the same fail-fast rules as every other loader apply.

SAM masks overlap and need not cover the image, so they are returned as (k, H, W) bool
masks; pooling uses ``reme.encoders.pooling.masks_average_pool`` and eq. 3 sums over masks
(``reme.inference.retrieval.pixel_class_scores_masks``). Pixels no mask covers would score 0 for every
class, so reme adds one extra proposal, the uncovered remainder, whenever it is non-empty.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from reme.encoders.factory import find_hub_weights, resolve_device

logger = logging.getLogger(__name__)


class SamProposals:
    """SAM automatic mask generator.

    Args:
        model: hub id or local folder of a transformers SAM checkpoint
            (default ``facebook/sam-vit-huge``, SAM's original default).
        points_per_side: the point grid is points_per_side x points_per_side (paper: 32).
        points_per_batch: prompts per decoder batch (memory vs speed).
        pred_iou_thresh: keep masks whose predicted IoU is at least this, in [0, 1] (SAM: 0.88).
        stability_score_thresh: keep masks at least this stable, in [0, 1] (SAM: 0.95).
        min_area: drop masks smaller than this many pixels (our default 20, like Felzenszwalb's
            min_size).
        device: "cpu", "cuda" or None (CUDA if available).

    Raises:
        reme.errors.MissingWeightsError: weights not found locally and not downloadable.
    """

    def __init__(self, model: str = "facebook/sam-vit-huge", *, points_per_side: int = 32,
                 points_per_batch: int = 64, pred_iou_thresh: float = 0.88,
                 stability_score_thresh: float = 0.95, min_area: int = 20, device=None):
        from transformers import pipeline

        source = find_hub_weights(model, family="sam", spec_prefix="sam:", local_prefix="sam:")
        self.device = resolve_device(device)
        self.spec = f"sam:{source}"
        self.points_per_side = int(points_per_side)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.min_area = int(min_area)
        self._pipe = pipeline("mask-generation", model=source, device=self.device)

    @torch.inference_mode()
    def masks(self, image: np.ndarray) -> np.ndarray:
        """Masks of one image.

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            (k, H, W) bool masks, largest first; the last one is the uncovered remainder when
            the kept masks do not cover every pixel (so every pixel gets a label in eq. 3).
        """
        from PIL import Image

        out = self._pipe(Image.fromarray(image), points_per_batch=self.points_per_batch,
                         points_per_crop=self.points_per_side, pred_iou_thresh=self.pred_iou_thresh,
                         stability_score_thresh=self.stability_score_thresh)
        H, W = image.shape[:2]
        masks = [np.asarray(m.cpu() if isinstance(m, torch.Tensor) else m, bool) for m in out["masks"]]
        masks = [m for m in masks if m.shape == (H, W) and m.sum() >= self.min_area]
        masks.sort(key=lambda m: -int(m.sum()))
        covered = np.zeros((H, W), bool)
        for m in masks:
            covered |= m
        if not covered.all():
            masks.append(~covered)
        return np.stack(masks) if masks else np.ones((1, H, W), bool)
