"""Two visual encoders fused per segment with GFA (OVSNet's Gradient-Free Aggregation).

Spec: ``gfa:PRIMARY+SECONDARY[@OMEGA[,LAMBDA]]``, e.g.
``gfa:dinov2-vitl14+clip-vit-b-16@0.5`` or, offline, ``gfa:classical+classical:size=160``.

A [`GFAFusedEncoder`][reme.encoders.fused.GFAFusedEncoder] is an ordinary
[`VisualEncoder`][reme.encoders.base.VisualEncoder] whose segment embeddings live in the PRIMARY
space (``dim`` = PRIMARY's):

1. `dense_features` runs both encoders and returns one grid on PRIMARY's (h, w) with the
   channels ``[phi_P | phi_Q]`` (SECONDARY's grid is resampled bilinearly to PRIMARY's).
2. `segment_embeddings` mask-average-pools both halves over the same k segments of one
   image (docs/method.md step 6), L2-normalises each, and fuses them with the closed-form random
   walk ``F* = (1 - omega)(I - omega A)^-1 F_P`` over those k segments
   ([`reme.encoders.gfa.gfa_fuse`][reme.encoders.gfa.gfa_fuse]; a linear solve, O(k^3) per image).

Because the spec names both encoders and omega, a reference set built with it records the
fusion in its manifest, and [`reme.Segmenter`][reme.Segmenter] rebuilds the same fused encoder for
test images: S_ref and S_test are fused the same way. The fusion is per image (the walk connects the
segments of one photo), never across the reference set.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from reme.encoders.base import VisualEncoder
from reme.encoders.gfa import gfa_fuse
from reme.encoders.pooling import mask_average_pool, masks_average_pool

#: Our defaults: omega = 0.5 (OVSNet's middle setting), lambda = 5 (reme.encoders.gfa.random_walk_matrix).
DEFAULT_OMEGA = 0.5
DEFAULT_LAMBDA = 5.0


def parse_gfa_target(target: str) -> tuple[str, str, float, float]:
    """Split ``PRIMARY+SECONDARY[@OMEGA[,LAMBDA]]``.

    Returns:
        (primary spec, secondary spec, omega, lambda).

    Raises:
        ValueError: no ``+``, an empty part, or a non-numeric omega / lambda.
    """
    body, at, params = target.rpartition("@")
    if not at or "+" in params:          # an '@' inside a path, not the parameters
        body, at, params = target, "", ""
    primary, plus, secondary = body.partition("+")
    if not plus or not primary.strip() or not secondary.strip():
        raise ValueError(f"GFA spec must be 'gfa:PRIMARY+SECONDARY[@OMEGA[,LAMBDA]]', got 'gfa:{target}'")
    omega, lam = DEFAULT_OMEGA, DEFAULT_LAMBDA
    if at:
        parts = params.split(",")
        try:
            omega = float(parts[0])
            lam = float(parts[1]) if len(parts) > 1 else DEFAULT_LAMBDA
        except (ValueError, IndexError):
            raise ValueError(f"GFA spec: '@{params}' must be '@OMEGA' or '@OMEGA,LAMBDA' (numbers)") from None
    return primary.strip(), secondary.strip(), omega, lam


class GFAFusedEncoder(VisualEncoder):
    """Visual encoder whose segment embeddings fuse two encoders by a GFA random walk.

    Args:
        primary: VisualEncoder whose space the fused embeddings live in (F_C of OVSNet).
        secondary: VisualEncoder that only shapes the walk's affinity (F_Q).
        omega: fusion degree in [0, 1); 0 returns PRIMARY's pooled embeddings unchanged.
        lam: affinity logit scale lambda of
            [`reme.encoders.gfa.random_walk_matrix`][reme.encoders.gfa.random_walk_matrix].

    Raises:
        ValueError: omega outside [0, 1) or lam <= 0.
    """

    def __init__(self, primary: VisualEncoder, secondary: VisualEncoder, omega: float = DEFAULT_OMEGA,
                 lam: float = DEFAULT_LAMBDA):
        if not 0.0 <= omega < 1.0:
            raise ValueError(f"GFA omega must lie in [0, 1), got {omega}")
        if lam <= 0:
            raise ValueError(f"GFA lambda must be > 0, got {lam}")
        self.primary, self.secondary = primary, secondary
        self.omega, self.lam = float(omega), float(lam)
        self.dim = primary.dim
        self.device = primary.device
        self.spec = f"gfa:{primary.spec}+{secondary.spec}@{self.omega:g},{self.lam:g}"

    def _stack(self, fp: torch.Tensor, fq: torch.Tensor) -> torch.Tensor:
        h, w, _ = fp.shape
        fq = fq.to(fp.device).float()
        if fq.shape[:2] != (h, w):
            fq = torch.nn.functional.interpolate(fq.permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                                                 align_corners=False)[0].permute(1, 2, 0)
        return torch.cat([fp.float(), fq], dim=2)

    def dense_features(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (h, w, d_P + d_Q) float32: both encoders on PRIMARY's grid."""
        return self._stack(self.primary.dense_features(image), self.secondary.dense_features(image))

    def dense_features_batch(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        fps = self.primary.dense_features_batch(images)
        fqs = self.secondary.dense_features_batch(images)
        return [self._stack(a, b) for a, b in zip(fps, fqs)]

    def _fuse(self, pooled: torch.Tensor, normalize: bool) -> torch.Tensor:
        d = self.primary.dim
        F_P = torch.nn.functional.normalize(pooled[:, :d], dim=1)
        F_Q = torch.nn.functional.normalize(pooled[:, d:], dim=1)
        if F_P.shape[0] == 0 or self.omega == 0.0:
            return F_P
        fused = gfa_fuse(F_P, F_Q, omega=self.omega, lam=self.lam, normalize=normalize)
        return fused.to(pooled.device)

    def segment_embeddings(self, features: torch.Tensor, seg: np.ndarray, normalize: bool = True,
                           image: np.ndarray | None = None) -> torch.Tensor:
        """Fused embeddings of the k segments of one image.

        Args:
            features: (h, w, d_P + d_Q) output of `dense_features`.
            seg: (H, W) int segment-id map (ids 0..k-1).
            normalize: L2-normalise the fused rows.
            image: unused (both views are mask-average-pooled).

        Returns:
            (k, d_P) float32 tensor.
        """
        return self._fuse(mask_average_pool(features, seg, normalize=False), normalize)

    def mask_embeddings(self, features: torch.Tensor, masks: np.ndarray, normalize: bool = True,
                        image: np.ndarray | None = None) -> torch.Tensor:
        """Like `segment_embeddings` for (k, H, W) bool, possibly overlapping masks."""
        return self._fuse(masks_average_pool(features, masks, normalize=False), normalize)


def load_gfa(target: str, *, device: torch.device, cache_dir: str | None = None, **kwargs) -> GFAFusedEncoder:
    """Loader for ``gfa:PRIMARY+SECONDARY[@OMEGA[,LAMBDA]]``; both parts go through
    [`reme.encoders.resolve_encoder`][reme.encoders.resolve_encoder] (same weight rules, same
    errors)."""
    from reme.encoders.factory import resolve_encoder

    p, q, omega, lam = parse_gfa_target(target)
    if any(x.startswith(("gfa:", "cls:")) for x in (p, q)):
        raise ValueError("GFA parts are pooled by mask average pooling: gfa: and cls: specs cannot be parts")
    primary = resolve_encoder(p, device=device, **kwargs)
    secondary = resolve_encoder(q, device=device)
    for name, enc in (("primary", primary), ("secondary", secondary)):
        if not isinstance(enc, VisualEncoder):
            raise ValueError(f"GFA {name} {enc.spec!r} is not a visual encoder")
    return GFAFusedEncoder(primary, secondary, omega=omega, lam=lam)
