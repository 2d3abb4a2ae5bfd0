"""Encoder interfaces shared by every backend.

A *visual encoder* maps an RGB image to a dense feature map; segment embeddings are
obtained from it by mask average pooling (docs/method.md step 6, ``reme.encoders.pooling``).
A *text encoder* maps strings to L2-normalised vectors (docs/method.md step 5).
A *captioner* maps an image to one or more captions (docs/method.md step 2).

Backends live in sibling modules (``classical``, ``clip``, ``dinov2``, ``minilm``,
``captioners``) and are created through
[`reme.encoders.resolve_encoder`][reme.encoders.resolve_encoder].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch

from reme.encoders.pooling import mask_average_pool, masks_average_pool


class VisualEncoder(ABC):
    """Frozen image encoder producing a dense feature map.

    Attributes:
        spec (str): the canonical spec string that `resolve_encoder` accepts to
            rebuild this encoder; stored in reference-set manifests.
        dim (int): dimension ``d`` of the segment embeddings, and of the dense features
            except for encoders that stack two views (``gfa:`` specs carry both encoders'
            channels in `dense_features`).
        device (torch.device): where the forward pass runs.
    """

    spec: str
    dim: int
    device: torch.device

    @abstractmethod
    def dense_features(self, image: np.ndarray) -> torch.Tensor:
        """Dense features of one image.

        Args:
            image: (H, W, 3) uint8 RGB array.

        Returns:
            (h, w, d) float32 tensor on ``self.device``; not normalised. The grid
            (h, w) covers the whole image (cell (i, j) spans rows ``i*H/h .. (i+1)*H/h``).

        Raises:
            TypeError, ValueError: ``image`` is not an (H, W, 3) uint8 array.
        """

    def dense_features_batch(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Dense features of several images; default loops over `dense_features`."""
        return [self.dense_features(im) for im in images]

    def segment_embeddings(self, features: torch.Tensor, seg: np.ndarray, normalize: bool = True,
                           image: np.ndarray | None = None) -> torch.Tensor:
        """Segment embeddings S_k from `dense_features` (docs/method.md step 6).

        Default: mask average pooling
            ([`reme.encoders.pooling.mask_average_pool`][reme.encoders.pooling.mask_average_pool]). Encoders that
        combine two views per segment (``reme.encoders.fused``) or embed masked crops
        (``reme.encoders.masked_crop``, which needs ``image``) override it.

        Args:
            features: (h, w, d') output of `dense_features`.
            seg: (H, W) int segment-id map, ids 0..k-1.
            normalize: L2-normalise the rows.
            image: the (H, W, 3) uint8 image the features came from (unused by pooling).

        Returns:
            (k, dim) float32 tensor.
        """
        return mask_average_pool(features, seg, normalize=normalize)

    def mask_embeddings(self, features: torch.Tensor, masks: np.ndarray, normalize: bool = True,
                        image: np.ndarray | None = None) -> torch.Tensor:
        """Like `segment_embeddings` for (k, H, W) bool, possibly overlapping masks
        ([`reme.encoders.pooling.masks_average_pool`][reme.encoders.pooling.masks_average_pool])."""
        return masks_average_pool(features, masks, normalize=normalize)


class TextEncoder(ABC):
    """Frozen text encoder.

    Attributes:
        spec (str): canonical spec string (see [`VisualEncoder`][reme.encoders.base.VisualEncoder]).
        dim (int): embedding dimension.
    """

    spec: str
    dim: int

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed strings.

        Args:
            texts: n strings.

        Returns:
            (n, dim) float32 array, each row L2-normalised. ``n == 0`` gives (0, dim).
        """


class Captioner(ABC):
    """Image captioner (docs/method.md step 2)."""

    spec: str

    @abstractmethod
    def caption(self, image: np.ndarray, key: str | None = None) -> list[str]:
        """Captions of one image.

        Args:
            image: (H, W, 3) uint8 RGB array.
            key: the image's file name relative to the image root; used by
                file-based captioners to look the captions up.

        Returns:
            A list of zero or more caption strings.
        """


class CLIPModel(VisualEncoder, TextEncoder):
    """An image-text model usable both as visual encoder (dense, text-aligned patch
    features) and as text encoder; needed for the pairing step (docs/method.md step 4)."""
