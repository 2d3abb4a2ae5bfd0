"""A weight-free visual encoder built from classical scikit-image features.

This is a **classical baseline**, not a substitute for DINOv2 or CLIP: it describes colour,
texture and image position, so it separates sky / road / vegetation / building well and
object categories (cat vs dog) poorly. It exists so that reme runs fully offline on a CPU
(tests, the embedded default reference set, retrieval-quality checks on CamVid) with the same
code path as the neural encoders.

Per-pixel channels (26 in all), computed on the image resized to ``image_size`` (short side):

* CIE Lab colour (3) and Lab colour blurred with a Gaussian of sigma = 1/16 of the short side
  (3, context),
* Gabor magnitude at 2 frequencies x 4 orientations on the grey image (8),
* uniform local binary patterns, P=8, R=1, one-hot over the 10 codes (10): pooled, a histogram,
* Sobel gradient magnitude (1), normalised row position y/H (1).

Channels are standardised with fixed constants and each group is weighted by
1/sqrt(group size), so no group dominates cosine similarity. The map is then average-pooled
over ``stride`` x ``stride`` pixel cells, giving an (h, w, 26) grid like a ViT's patch grid.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage, signal
from skimage import color, transform
from skimage.feature import local_binary_pattern
from skimage.filters import gabor_kernel, sobel

from reme.encoders.base import VisualEncoder

_GABOR_FREQS = (0.1, 0.25)
_GABOR_THETAS = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
_LBP_P, _LBP_R = 8, 1
# (name, n_channels, mean, std): fixed standardisation constants, chosen by us from the
# scikit-image sample photos (astronaut, coffee, chelsea, rocket); they only need to put
# every channel on a comparable scale.
_GROUPS = (
    ("lab", 3, np.array([50.0, 0.0, 0.0]), np.array([25.0, 15.0, 20.0])),
    ("lab_context", 3, np.array([50.0, 0.0, 0.0]), np.array([20.0, 10.0, 15.0])),
    ("gabor", 8, 0.03, 0.03),
    ("lbp", 10, 0.1, 0.2),
    ("gradient", 1, 0.05, 0.05),
    ("row", 1, 0.5, 0.29),
)
FEATURE_DIM = sum(g[1] for g in _GROUPS)


def _gabor_bank() -> list[np.ndarray]:
    return [np.asarray(gabor_kernel(f, theta=t)) for f in _GABOR_FREQS for t in _GABOR_THETAS]


def classical_pixel_features(image: np.ndarray, kernels: list[np.ndarray] | None = None) -> np.ndarray:
    """Standardised per-pixel classical features.

    Args:
        image: (H, W, 3) uint8 RGB.
        kernels: Gabor kernels (default: the 8-kernel bank of the module docstring).

    Returns:
        (H, W, 26) float32 array.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    rgb = image.astype(np.float32) / 255.0
    h, w = rgb.shape[:2]
    lab = color.rgb2lab(rgb).astype(np.float32)
    sigma = max(h, w) / 16.0 if min(h, w) < 2 else min(h, w) / 16.0
    lab_ctx = np.stack([ndimage.gaussian_filter(lab[..., c], sigma) for c in range(3)], -1)
    grey = color.rgb2gray(rgb).astype(np.float32)
    kernels = _gabor_bank() if kernels is None else kernels
    gab = np.stack(
        [np.abs(signal.fftconvolve(grey, k, mode="same")).astype(np.float32) for k in kernels], -1
    )
    codes = local_binary_pattern((grey * 255).astype(np.uint8), _LBP_P, _LBP_R, method="uniform")
    lbp = np.eye(_LBP_P + 2, dtype=np.float32)[codes.astype(np.int64)]
    grad = sobel(grey)[..., None].astype(np.float32)
    row = np.broadcast_to(np.linspace(0, 1, h, dtype=np.float32)[:, None, None], (h, w, 1))
    parts = []
    for (name, n, mean, std), arr in zip(_GROUPS, (lab, lab_ctx, gab, lbp, grad, row)):
        parts.append((arr - mean) / std / np.sqrt(n))
    return np.concatenate(parts, axis=-1).astype(np.float32)


class ClassicalEncoder(VisualEncoder):
    """Weight-free dense encoder (module docstring).

    Args:
        image_size: short side, in pixels, the image is resized to before feature
            extraction (default 320, chosen by us: CamVid's 360 px rows at ~1/3 s per image).
        stride: cell size in pixels of the output grid (default 8).
        device: where the returned tensor lives.
    """

    def __init__(self, image_size: int = 320, stride: int = 8, device: torch.device | str = "cpu"):
        if image_size < 8 or stride < 1:
            raise ValueError(f"image_size must be >= 8 and stride >= 1, got {image_size}, {stride}")
        self.image_size = int(image_size)
        self.stride = int(stride)
        self.device = torch.device(device)
        self.dim = FEATURE_DIM
        default = (self.image_size, self.stride) == (320, 8)
        self.spec = "classical" if default else f"classical:size={self.image_size},stride={self.stride}"
        self._kernels = _gabor_bank()

    def dense_features(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (h, w, 26) float32 tensor, h = ceil(H' / stride) on the resized image."""
        h0, w0 = image.shape[:2]
        scale = self.image_size / min(h0, w0)
        if abs(scale - 1.0) > 1e-3:
            size = (max(1, round(h0 * scale)), max(1, round(w0 * scale)))
            image = (transform.resize(image, size, order=1, anti_aliasing=scale < 1) * 255).astype(np.uint8)
        feats = classical_pixel_features(image, self._kernels)
        h, w, d = feats.shape
        s = self.stride
        gh, gw = -(-h // s), -(-w // s)
        pad = np.pad(feats, ((0, gh * s - h), (0, gw * s - w), (0, 0)), mode="edge")
        grid = pad.reshape(gh, s, gw, s, d).mean(axis=(1, 3))
        return torch.from_numpy(np.ascontiguousarray(grid)).to(self.device)


def load_classical(target: str = "", *, device: torch.device, cache_dir: str | None = None, **kwargs) -> ClassicalEncoder:
    """Loader for ``classical`` and ``classical:size=S,stride=T`` (short side S px, T px cells;
    defaults 320 and 8); further kwargs go to `ClassicalEncoder`.

    Raises:
        ValueError: an unknown or non-integer option in the target.
    """
    opts = {}
    for part in filter(None, (p.strip() for p in target.split(","))):
        key, eq, val = part.partition("=")
        name = {"size": "image_size", "stride": "stride"}.get(key.strip())
        if not eq or name is None or not val.strip().isdigit():
            raise ValueError(f"classical spec options are size=INT,stride=INT, got 'classical:{target}'")
        opts[name] = int(val)
    return ClassicalEncoder(device=device, **{**opts, **kwargs})
