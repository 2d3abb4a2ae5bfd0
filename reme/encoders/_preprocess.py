"""Image-to-tensor preprocessing shared by the dense encoders (``dinov2``, ``clip``,
``mobilenet``): RGB checks, the patch grid of an image (short side to ``image_size``, sides
rounded to a multiple of the patch size) and mean/std normalisation.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: ImageNet normalisation (DINOv2's training statistics).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def check_rgb_uint8(image: Any) -> np.ndarray:
    """Validate an (H, W, 3) uint8 RGB array.

    Raises:
        TypeError: not a numpy array, or not uint8 (it is not silently rescaled).
        ValueError: wrong shape or an empty side.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy (H, W, 3) uint8 array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8 in [0, 255], got dtype {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image has an empty side: {image.shape}")
    return image


def patch_grid(height: int, width: int, image_size: int, patch: tuple[int, int]) -> tuple[int, int]:
    """Feature grid (h, w) for an image whose short side is resized to ``image_size``.

    Each side is scaled by ``image_size / min(height, width)`` and rounded to the nearest
    multiple of the patch size (at least one patch), so the aspect ratio is kept up to rounding.
    """
    scale = image_size / min(height, width)
    gh = max(1, int(round(height * scale / patch[0])))
    gw = max(1, int(round(width * scale / patch[1])))
    return gh, gw


def to_model_input(
    image: np.ndarray,
    *,
    image_size: int,
    patch: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Resize and normalise one image for a patch-based encoder.

    Args:
        image: (H, W, 3) uint8 RGB.
        image_size: target length of the short side, in pixels.
        patch: (ph, pw) patch size; both output sides are multiples of it.
        mean, std: per-channel normalisation of [0, 1] pixel values.
        device, dtype: of the returned tensor.
        interpolation: ``"bicubic"`` or ``"bilinear"`` (antialiased when shrinking).

    Returns:
        (1, 3, gh * ph, gw * pw) tensor, ``(gh, gw) = patch_grid(H, W, image_size, patch)``.
        The whole image is resized (no crop, no padding), so grid cell (i, j) covers rows
        ``i*H/gh .. (i+1)*H/gh`` of the original.
    """
    image = check_rgb_uint8(image)
    gh, gw = patch_grid(image.shape[0], image.shape[1], image_size, patch)
    size = (gh * patch[0], gw * patch[1])
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(device)
    x = x.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    if tuple(x.shape[-2:]) != size:
        mode = "bilinear" if interpolation == "bilinear" else "bicubic"
        x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


class PatchGridInput:
    """``preprocess`` and ``grid_size`` of ViT encoders whose input is the image with its short
    side resized to ``image_size`` and each side rounded to a multiple of ``patch_size``.

    The class using it provides ``image_size``, ``patch_size``, ``mean``, ``std``, ``device``,
    ``dtype`` and ``interpolation`` (`reme.encoders.clip.CLIPEncoder`,
    `reme.encoders.dinov2.DINOv2Encoder`).
    """

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Feature grid (h, w) that ``dense_features`` gives for an H x W image."""
        return patch_grid(height, width, self.image_size, self.patch_size)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (1, 3, h * ph, w * pw) tensor on ``self.device`` in the model's
        dtype: short side resized to ``image_size`` (``interpolation``), sides rounded to
        multiples of the patch size, normalised with ``mean`` / ``std``."""
        return to_model_input(image, image_size=self.image_size, patch=self.patch_size, mean=self.mean,
                              std=self.std, device=self.device, dtype=self.dtype,
                              interpolation=self.interpolation)
