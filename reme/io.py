"""Image reading and atomic file writing."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from reme.errors import ImageReadError, ImageTypeError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: Images with more pixels than this are refused (decompression-bomb guard), 100 MP. The
#: check reads only the file header, so a refused image is never decoded. It replaces
#: Pillow's own guard (``Image.MAX_IMAGE_PIXELS``: a warning above 89 MP, an error above
#: 179 MP), which is switched off while the header is read so that `read_image` can
#: decode a larger JPEG at reduced size, never allocating its full size.
MAX_PIXELS = 100_000_000

_BOMB_LOCK = threading.Lock()
#: Pillow modes resized directly (bilinear) before conversion to RGB.
_RESIZABLE_MODES = ("L", "RGB", "RGBA", "LA", "CMYK", "I", "F", "RGBX")


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """PIL image of any mode (L, LA, P, RGBA, CMYK, I;16, F) -> (H, W, 3) uint8 RGB, EXIF-rotated."""
    if _exif_orientation(img) not in (1, 0):  # exif_transpose copies even when there is nothing to do
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
    return np.ascontiguousarray(np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8))


def load_image(source, *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image as RGB.

    Args:
        source: a path, ``"skimage:NAME"`` (a photo bundled with scikit-image, e.g.
            ``skimage:astronaut``), a PIL image, or an (H, W, 3) / (H, W) uint8 array.
        max_pixels: for paths and PIL images, downscale images with more pixels than this
            (see `read_image`); None keeps the full resolution.

    Returns:
        (H, W, 3) uint8 RGB array (EXIF orientation applied; grey, palette, alpha, CMYK and
        16-bit images converted; alpha composited on white).

    Raises:
        ImageReadError: missing, empty, truncated or undecodable file, an image (file or PIL
            image) over `MAX_PIXELS` that cannot be decoded at reduced size, or an array
            of the wrong shape or dtype (the message gives the shape and dtype received).
        ImageTypeError: ``source`` is none of the accepted kinds (bytes, None, a list, a
            torch tensor, ...); the message lists the accepted inputs.
    """
    return load_image_bounded(source, max_pixels=max_pixels)[0]


#: What `load_image` accepts, for error messages.
ACCEPTED_IMAGE_INPUTS = ("a file path (str or pathlib.Path), 'skimage:NAME', a PIL.Image.Image, "
                         "or an (H, W, 3) / (H, W) uint8 numpy array")


def _check_array(arr: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3|4) uint8 -> (H, W, 3) uint8; the error reports the shape as given."""
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageReadError(f"expected an (H, W, 3) or (H, W) uint8 array, got shape {arr.shape} dtype {arr.dtype}")
    if min(arr.shape[:2]) < 1:
        raise ImageReadError(f"empty image array of shape {arr.shape}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def working_size(h: int, w: int, max_pixels: int | None) -> tuple[int, int]:
    """(h', w') of an h x w image scaled (aspect ratio kept) to at most ``max_pixels``
    pixels; (h, w) itself when it fits or ``max_pixels`` is None."""
    if max_pixels is None or h * w <= max_pixels:
        return h, w
    s = (max_pixels / (h * w)) ** 0.5
    return max(1, int(h * s)), max(1, int(w * s))


def resize_rgb(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear with Pillow's antialiasing reduction."""
    if img.shape[:2] == tuple(size_hw):
        return img
    out = Image.fromarray(img).resize((size_hw[1], size_hw[0]), Image.BILINEAR, reducing_gap=2.0)
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8))


def load_image_bounded(source, *, max_pixels: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """`load_image` at a bounded size: ``(image, (H0, W0))``.

    A file or PIL image over ``max_pixels`` is decoded at reduced size (JPEG DCT scaling,
    `read_image`) and resized, never held at full size; an array or bundled photo is
    resized (bilinear). ``(H0, W0)`` is the full (EXIF-oriented) input size. A lazily opened
    PIL JPEG over ``max_pixels`` is decoded through ``Image.draft``, which changes that image
    object's size and mode in place (Pillow's only way to decode a JPEG at reduced size).

    Args:
        source: as `load_image`.
        max_pixels: largest output size in pixels; None keeps the full resolution.

    Returns:
        ``(image, (H0, W0))``: (h, w, 3) uint8 RGB with h * w <= max_pixels, and the input size.

    Raises:
        ImageReadError, ImageTypeError: as `load_image`.
    """
    if isinstance(source, np.ndarray):
        arr = _check_array(source)
    elif isinstance(source, Image.Image):
        return _decode_bounded(source, max_pixels, "PIL image")
    elif isinstance(source, str) and source.startswith(SAMPLE_PREFIX):
        arr = sample_image(source[len(SAMPLE_PREFIX):])
    elif isinstance(source, (str, os.PathLike)):
        return read_image(source, max_pixels=max_pixels)
    else:
        raise ImageTypeError(f"cannot read an image from {type(source).__module__}.{type(source).__qualname__}; "
                             f"give {ACCEPTED_IMAGE_INPUTS}")
    H0, W0 = arr.shape[:2]
    return resize_rgb(arr, working_size(H0, W0, max_pixels)), (H0, W0)


@contextlib.contextmanager
def _pillow_bomb_guard_off() -> Iterator[None]:
    """Let ``Image.open`` read the header of a huge file; `read_image` applies its own
    limits before anything is decoded."""
    with _BOMB_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def read_image(path: str | Path, *, max_pixels: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Read an image file as RGB, downscaling images larger than ``max_pixels``.

    Memory is bounded by the output size, not the file's: the pixel count is checked from the
    header before decoding; a JPEG over the limit is decoded at 1/2, 1/4 or 1/8 scale by
    libjpeg (``Image.draft``), so a 20000 x 20000 photo never allocates its 1.2 GB full size;
    other formats are decoded at full size only up to `MAX_PIXELS` and then resized.

    Args:
        path: image file.
        max_pixels: largest output size in pixels (H * W); larger images are resized
            (bilinear, aspect ratio kept) to fit. None: keep the full resolution.

    Returns:
        ``(image, (H0, W0))``: (H, W, 3) uint8 RGB (EXIF orientation applied, modes converted
        as `to_rgb_array`) and the original oriented size in pixels.

    Raises:
        ImageReadError: missing, empty, truncated or undecodable file; more than
            `MAX_PIXELS` pixels and not a JPEG that can be reduced under it; a file
            whose size is 0 x 0.
        ValueError: ``max_pixels`` < 1.
    """
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
    return _with_image(path, lambda img, where: _decode_bounded(img, max_pixels, where))


def _with_image(path: str | Path, use):
    """``use(img, str(path))`` on the opened image file (Pillow's bomb guard off: `MAX_PIXELS`
    is checked by ``use``), mapping every failure to one `ImageReadError` naming the path."""
    path = Path(path)
    if path.is_dir():
        raise ImageReadError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageReadError(f"image file is empty (0 bytes): {path}")
    try:
        with _pillow_bomb_guard_off():
            img = Image.open(path)
        with img:
            return use(img, str(path))
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot decode image {path}: {exc}") from exc


def _decode_bounded(img: Image.Image, max_pixels: int | None, where: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Body of `read_image` for an opened (possibly not yet decoded) PIL image.

    The pixel count is checked from the header (``img.size``) before anything that could
    decode the image: Pillow's ``getexif()`` on a PNG loads the whole image, so the EXIF
    orientation is read only after the `MAX_PIXELS` check.
    """
    try:
        W0, H0 = _check_header(img, max_pixels, where)
        oriented = (W0, H0) if _exif_orientation(img) not in (5, 6, 7, 8) else (H0, W0)  # after the size check
        img.load()
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            s = (max_pixels / (w * h)) ** 0.5
            size = (max(1, int(w * s)), max(1, int(h * s)))
            logger.debug("downscaling %s from %dx%d to %dx%d", where, w, h, *size)
            if img.mode not in _RESIZABLE_MODES:
                img = Image.fromarray(to_rgb_array(img))  # 16-bit, palette, 1-bit: convert first
            # resized before EXIF rotation (scaling commutes with it; ``info`` keeps the tag)
            img = img.resize(size, Image.BILINEAR, reducing_gap=2.0)
        out = to_rgb_array(img)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot decode image {where}: {exc}") from exc
    return out, (oriented[1], oriented[0])


def _check_header(img: Image.Image, max_pixels: int | None, where: str) -> tuple[int, int]:
    """``(W0, H0)`` from the header of an opened image, refusing one with no pixels or over
    `MAX_PIXELS` (a JPEG is first set to decode at the reduced size ``max_pixels`` asks for)."""
    W0, H0 = img.size
    if W0 < 1 or H0 < 1:
        raise ImageReadError(f"{where}: image of size {W0}x{H0} has no pixels")
    n = W0 * H0
    if max_pixels is not None and n > max_pixels and img.format == "JPEG":
        s = (max_pixels / n) ** 0.5
        img.draft("RGB", (max(1, int(W0 * s)), max(1, int(H0 * s))))  # libjpeg DCT scaling
    if img.size[0] * img.size[1] > MAX_PIXELS:
        raise ImageReadError(
            f"{where}: {W0}x{H0} exceeds {MAX_PIXELS} pixels; downscale it first"
            + ("" if img.format == "JPEG" else " (only JPEGs are decoded at reduced size)")
        )
    return W0, H0


def probe_image(path: str | Path, *, max_pixels: int | None = None) -> tuple[int, int]:
    """Check an image file from its header only (no decoding, no model): what `read_image`
    would refuse before decoding, in milliseconds. ``skimage:NAME`` names are checked too.

    Returns:
        ``(H0, W0)``, the stored size in pixels (EXIF orientation not applied; (0, 0) for a
        sample photo).

    Raises:
        ImageReadError: missing file, a folder, an empty or undecodable file, or more than
            `MAX_PIXELS` pixels (see `read_image`); the message names the path.
        ValueError: ``max_pixels`` < 1.
    """
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1 or None, got {max_pixels}")
    if isinstance(path, str) and path.startswith(SAMPLE_PREFIX):
        if path[len(SAMPLE_PREFIX):] not in SAMPLE_PHOTOS:
            raise ImageReadError(f"unknown sample photo {path!r}; choose from {', '.join(SAMPLE_PHOTOS)}")
        return 0, 0
    W0, H0 = _with_image(path, lambda img, where: _check_header(img, max_pixels, where))
    return H0, W0


def expand_image_args(args: Sequence[str]) -> list[str]:
    """Image arguments with each folder replaced by its images (`list_images`, recursive,
    sorted); files and ``skimage:NAME`` names are kept as given.

    Raises:
        ImageReadError: a folder that holds no image (the message names it and the extensions).
    """
    out: list[str] = []
    for a in args:
        if not a.startswith(SAMPLE_PREFIX) and Path(a).is_dir():
            found = list_images(a)
            if not found:
                raise ImageReadError(f"{a}: a folder with no images ({', '.join(IMAGE_EXTENSIONS)}) in it")
            out += [str(p) for p in found]
        else:
            out.append(a)
    return out


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # malformed EXIF: to_rgb_array's exif_transpose ignores it as well
        return 1


SAMPLE_PREFIX = "skimage:"
#: Colour photos that scikit-image ships inside its wheel (no download needed).
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle")


def sample_image(name: str) -> np.ndarray:
    """A colour photo bundled with scikit-image: (H, W, 3) uint8.

    Raises:
        ImageReadError: unknown name (the message lists `SAMPLE_PHOTOS`).
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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``block``-byte chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def _exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system cannot (other OS, old glibc, a file system without it)."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder onto ``final``, replacing an existing one only after
    the new one is in place. On Linux the two are swapped in one step, so a reader always
    finds ``final`` (old or new); elsewhere the old one is renamed aside first, leaving a
    moment without ``final``. The old folder is then removed."""
    if final.exists() and _exchange_dirs(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_bytes_atomic(final: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``final`` atomically (temp file + fsync + rename).

    Readers see either the old file or the complete new one, also after ``kill -9`` or a
    failed write (disk full): the temporary file is removed and ``final`` is left untouched.

    Raises:
        OSError: the write, fsync or rename failed (e.g. ``ENOSPC``, ``EACCES``).
    """
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())


def pixels_key(img: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    """Identity of an image's pixels: ``(shape, 16-byte BLAKE2b digest of the bytes)`` (~2 ms per
    megapixel); equal keys mean equal pixels for caching purposes.

    Args:
        img: any numpy array (an (H, W, 3) uint8 image in reme).

    Returns:
        ``(img.shape, digest)``, hashable.

    Raises:
        TypeError: ``img`` is not array-like.

    Examples:
        >>> a = np.zeros((2, 3, 3), np.uint8)
        >>> pixels_key(a) == pixels_key(a.copy()), pixels_key(a) == pixels_key(a + 1)
        (True, False)
    """
    import hashlib

    arr = np.asarray(img)
    return arr.shape, hashlib.blake2b(np.ascontiguousarray(arr).data, digest_size=16).digest()


def cell_index(size: int, cells: int, *, centre: bool = False) -> np.ndarray:
    """Index of the cell of a ``cells``-long grid that each of ``size`` pixels falls in (one axis).

    Two conventions are in use and kept, because switching either would change outputs:

    * ``centre=False``: ``floor(i * cells / size)`` in integers, the pixel's top-left corner
      (mask pooling onto the feature grid, cluster proposals);
    * ``centre=True``: ``floor((i + 0.5) * cells / size)`` in floats, the pixel's centre (the
      nearest-neighbour resize of label maps between working and input size).

    Args:
        size: pixels along the axis (>= 0).
        cells: grid cells along the axis (>= 1).
        centre: which convention (above).

    Returns:
        (size,) int64 cell indices in [0, cells).

    Raises:
        ValueError: ``cells`` < 1.

    Examples:
        >>> cell_index(5, 2).tolist(), cell_index(5, 2, centre=True).tolist()
        ([0, 0, 0, 1, 1], [0, 0, 1, 1, 1])
    """
    if int(cells) < 1:
        raise ValueError(f"cells must be >= 1, got {cells}")
    if centre:
        return np.minimum(((np.arange(size) + 0.5) * (cells / size)).astype(np.int64), cells - 1)
    return np.minimum((np.arange(size) * cells) // size, cells - 1)


def read_parquet(path: str | Path):
    """A whole Parquet file as a ``pyarrow.Table``.

    ``pyarrow.parquet.ParquetFile(path).read()`` gives the same table as ``pq.read_table(path)``
    without importing ``pyarrow.dataset``, which ``read_table`` does on first use (0.4 s of every
    cold ``reme segment``, docs/performance.md).

    Raises:
        OSError: the file cannot be opened. pyarrow.ArrowInvalid: it is not Parquet (truncated,
            corrupt).
    """
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        return f.read()


def arrow_values(arr) -> np.ndarray:
    """The values of a primitive, null-free ``pyarrow.Array`` (or ``ChunkedArray``, combined
    first) as a read-only NumPy view.

    Same values as ``arr.to_numpy(zero_copy_only=False)``, which imports pandas on first use
    (0.3 s of every cold ``reme segment``); arrays with nulls or non-numeric types go that way.

    Example:
        >>> import pyarrow as pa
        >>> arrow_values(pa.array([1.5, 2.5], pa.float32()).slice(1)).tolist()
        [2.5]
    """
    if hasattr(arr, "combine_chunks"):
        arr = arr.combine_chunks()
    if arr.null_count or not (arr.type.bit_width and arr.type.bit_width % 8 == 0):
        return arr.to_numpy(zero_copy_only=False)
    dtype = np.dtype(arr.type.to_pandas_dtype())
    if dtype.itemsize * 8 != arr.type.bit_width or dtype.kind not in "iuf":
        return arr.to_numpy(zero_copy_only=False)
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)
