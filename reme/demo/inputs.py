"""What the demo accepts and draws: uploads decoded at the working size, class fields and taught
labels within limits, downscaling, colour overlays, PNGs."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
from PIL import Image

from reme.io import MAX_PIXELS, to_rgb_array
from reme.report.viz import class_colors

#: Longest image side the demo segments at; larger uploads are downscaled first (our choice:
#: keeps one request at a few seconds on a 2-core CPU with the classical encoder).
MAX_SIDE = 800
#: Largest upload accepted, in bytes (checked before anything is decoded).
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
#: Uploads decoded at the same time; the others wait their turn (bounds decode memory: a JPEG is
#: decoded at a reduced scale near ``MAX_SIDE``, other formats at full size, at most
#: ``MAX_PIXELS`` each).
DECODE_SLOTS = 2
#: Classes per request, and class names counting synonyms (a 5000-class request held the
#: segmentation lock for 37 s; 50 classes take about as long as the segmentation itself).
MAX_CLASSES = 50
MAX_CLASS_TERMS = 200
#: Characters in the class field.
MAX_CLASS_CHARS = 4000
#: Characters in a taught label.
MAX_LABEL_CHARS = 60


def png_data_url(img: Image.Image | np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URL of an RGB image (fast zlib level 1: the page is local,
    encoding time matters more than bytes)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


_decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)


def read_upload(data: bytes, max_side: int = MAX_SIDE) -> np.ndarray:
    """Decode uploaded image bytes to (H, W, 3) uint8 RGB at the demo's working size.

    The header is read first (size and pixel-count checks, nothing decoded); the pixels are then
    decoded while holding one of `DECODE_SLOTS` slots, JPEGs at the smallest DCT scale that
    keeps the longest side at least ``max_side`` (``PIL.Image.draft``), and the result is
    reduced to ``max_side`` (see `downscale`) before the slot is released.

    Args:
        data: the uploaded file's bytes.
        max_side: longest side of the returned image, in pixels.

    Returns:
        (H, W, 3) uint8 RGB, EXIF orientation applied, longest side at most ``max_side``.

    Raises:
        ValueError: empty, larger than `MAX_UPLOAD_BYTES`, not an image, damaged, or more
            pixels than `reme.io.MAX_PIXELS` (100 million); the message is plain text.
    """
    if not data:
        raise ValueError("the uploaded file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(f"the upload is {len(data) / 2**20:.0f} MiB; the demo takes files up to "
                         f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ValueError(f"the image has more than {MAX_PIXELS} pixels; downscale it first") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError("cannot decode the uploaded file as an image: not a format Pillow reads "
                         "(JPEG, PNG, WebP, TIFF, BMP, GIF, ...)") from exc
    with img:
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"the image is {img.width}x{img.height} = {img.width * img.height} pixels, over "
                             f"the limit of {MAX_PIXELS}; downscale it first")
        with _decode_slots:
            try:
                if img.format == "JPEG" and max(img.size) > max_side:
                    s = max_side / max(img.size)
                    img.draft("RGB", (max(1, int(img.width * s)), max(1, int(img.height * s))))
                img.load()
                arr = to_rgb_array(img)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                raise ValueError("cannot decode the uploaded file as an image: the data is truncated "
                                 f"or damaged ({type(exc).__name__})") from exc
            return downscale(arr, max_side)


def downscale(image: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """``image`` with its longest side reduced to ``max_side`` (unchanged if already smaller)."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((max(1, round(w * s)), max(1, round(h * s))),
                                                    Image.Resampling.LANCZOS))


def blend(image: np.ndarray, label_map: np.ndarray, n_classes: int, alpha: float = 0.5,
          outline: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 colour overlay of a label map; ``outline`` (H, W) bool is drawn in yellow."""
    colors = class_colors(n_classes).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + colors[np.maximum(label_map, 0)] * alpha
    out[label_map < 0] = image[label_map < 0]                   # unlabelled ("none of these"): the photo
    if outline is not None:
        m = outline
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        edge |= np.roll(edge, 1, 0) | np.roll(edge, 1, 1)
        out[m] = out[m] * 0.6 + 255 * 0.4
        out[edge] = (255, 230, 0)
    return out.clip(0, 255).astype(np.uint8)


def check_classes(classes: str) -> tuple[list[str], list[list[str]]]:
    """Parse a class field of the demo form and apply its limits.

    Returns:
        ``(names, synonyms)`` as [`reme.classes.parse_classes`][reme.classes.parse_classes].

    Raises:
        ValueError: empty, malformed (see `parse_classes`), longer than `MAX_CLASS_CHARS`
            characters, more than `MAX_CLASSES` classes or `MAX_CLASS_TERMS` names with synonyms.
    """
    from reme.classes import parse_classes

    if not classes or not classes.strip():
        raise ValueError("type at least one class name, e.g. 'cat, dog, sofa'")
    if len(classes) > MAX_CLASS_CHARS:
        raise ValueError(f"the class list has {len(classes)} characters; the demo takes up to {MAX_CLASS_CHARS}")
    n = sum(1 for item in classes.split(",") if item.strip())  # before parsing: the message stays short
    if n > MAX_CLASSES:
        raise ValueError(f"{n} classes; the demo takes up to {MAX_CLASSES} per request")
    names, synonyms = parse_classes(classes)
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{len(names)} classes; the demo takes up to {MAX_CLASSES} per request")
    terms = sum(len(s) for s in synonyms)
    if terms > MAX_CLASS_TERMS:
        raise ValueError(f"{terms} class names with synonyms; the demo takes up to {MAX_CLASS_TERMS} per request")
    return names, synonyms


def check_label(label: str) -> str:
    """A label typed in the demo's "Label this as" field, normalised (white space collapsed).

    Raises:
        ValueError: empty, longer than `MAX_LABEL_CHARS` characters, or containing ``,`` or
            ``;`` (they separate classes and synonyms in the class field).
    """
    text = " ".join(str(label or "").split())
    if not text:
        raise ValueError("type a label for the segment, e.g. 'rug'")
    if len(text) > MAX_LABEL_CHARS:
        raise ValueError(f"the label has {len(text)} characters; the demo takes up to {MAX_LABEL_CHARS}")
    if "," in text or ";" in text:
        raise ValueError("a label cannot contain ',' or ';' (they separate classes and synonyms)")
    return text


def with_class(class_spec: str, label: str) -> tuple[str, str]:
    """``(class_spec, label)`` with ``label`` appended as a new class, unless a class or synonym
    already has that name (case-insensitive): then the spec unchanged and the label spelled as
    there ("Cat" -> "cat")."""
    from reme.classes import parse_classes

    _, synonyms = parse_classes(class_spec)
    for name in (x for syns in synonyms for x in syns):
        if name.lower() == label.lower():
            return class_spec, name
    return f"{class_spec.rstrip().rstrip(',')}, {label}", label
