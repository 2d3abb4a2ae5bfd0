"""Image reading and atomic file writing."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from reme.errors import ImageReadError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: Images with more pixels than this are refused (decompression-bomb guard), 100 MP.
MAX_PIXELS = 100_000_000


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """PIL image of any mode (L, LA, P, RGBA, CMYK, I;16, F) -> (H, W, 3) uint8 RGB, EXIF-rotated."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = (arr / (hi if hi > 0 else 1.0) * 255.0).round().astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def load_image(source) -> np.ndarray:
    """Read an image as RGB.

    Args:
        source: a path, ``"skimage:NAME"`` (a photo bundled with scikit-image, e.g.
            ``skimage:astronaut``), a PIL image, or an (H, W, 3) / (H, W) uint8 array.

    Returns:
        (H, W, 3) uint8 RGB array (EXIF orientation applied; grey, palette, alpha, CMYK and
        16-bit images converted; alpha composited on white).

    Raises:
        ImageReadError: missing, empty, truncated or undecodable file, an image over
            :data:`MAX_PIXELS`, or an array of the wrong shape or dtype.
    """
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
            raise ImageReadError(f"expected an (H, W, 3) uint8 array, got shape {arr.shape} dtype {arr.dtype}")
        if min(arr.shape[:2]) < 1:
            raise ImageReadError(f"empty image array of shape {arr.shape}")
        return np.ascontiguousarray(arr[:, :, :3])
    if isinstance(source, Image.Image):
        return to_rgb_array(source)
    if isinstance(source, str) and source.startswith(SAMPLE_PREFIX):
        return sample_image(source[len(SAMPLE_PREFIX):])
    path = Path(source)
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageReadError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageReadError(
                    f"{path}: {img.width}x{img.height} exceeds {MAX_PIXELS} pixels; downscale it first"
                )
            img.load()
            return to_rgb_array(img)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot decode image {path}: {exc}") from exc


SAMPLE_PREFIX = "skimage:"
#: Colour photos that scikit-image ships inside its wheel (no download needed).
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle")


def sample_image(name: str) -> np.ndarray:
    """A colour photo bundled with scikit-image: (H, W, 3) uint8.

    Raises:
        ImageReadError: unknown name (the message lists :data:`SAMPLE_PHOTOS`).
    """
    import skimage.data

    if name not in SAMPLE_PHOTOS:
        raise ImageReadError(f"unknown sample photo {name!r}; choose from {', '.join(SAMPLE_PHOTOS)}")
    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return np.ascontiguousarray(img[:, :, :3])


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive), sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block
    succeeds, so readers never see a half-written file."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
