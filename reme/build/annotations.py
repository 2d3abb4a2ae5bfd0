"""Ground-truth annotations for GT-mode reference sets (the paper's Fig. 1b "GT reference").

Three sources: COCO instance JSON (polygons and RLE), folders of index-PNG masks with a
class-name file (VOC, CamVid, COCO-Object masks), and folders of YOLO label files (polygons of
YOLO-seg, or boxes) with a class-name file. Each gives, per image, an (H, W) int32 GT label map
with -1 for unlabelled / ignored pixels, plus the label names.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from skimage.draw import polygon as draw_polygon

logger = logging.getLogger(__name__)


def safe_relpath(name: str, where: str) -> str:
    """``name`` as a relative POSIX path under an image root.

    Args:
        name: a file name from a list or an annotation file (``\\`` read as ``/``).
        where: what the name came from, for the error message.

    Returns:
        The normalised relative path.

    Raises:
        ValueError: the path is empty, absolute or contains ``..``.
    """
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"{where}: path {name!r} escapes the image root (absolute or '..'); refusing it")
    return str(p)


def decode_coco_rle(rle: dict, height: int, width: int) -> np.ndarray:
    """Decode a COCO RLE (``counts`` as list or compressed string) to an (H, W) bool mask with
    pycocotools (column-major run lengths; Lin et al., ECCV 2014, COCO format).

    Raises:
        ValueError: malformed counts (pycocotools: "Invalid RLE mask representation").
        KeyError, TypeError: no ``counts`` or counts of the wrong type.
    """
    counts = rle["counts"]
    if isinstance(counts, list):
        obj = mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
    elif isinstance(counts, (str, bytes)):
        obj = {"counts": counts.encode("ascii") if isinstance(counts, str) else counts, "size": [height, width]}
    else:
        raise TypeError(f"RLE counts must be a list or a string, got {type(counts).__name__}")
    return mask_utils.decode(obj).astype(bool)


class CocoInstances:
    """COCO instance annotations (``instances_*.json``).

    Args:
        path: the JSON file.

    Raises:
        ValueError: the file is not valid UTF-8 JSON, a file name escapes the image root, or
            the JSON lacks images/categories; the message names the file.
        FileNotFoundError: no such file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        data = read_json_file(path)
        if not isinstance(data, dict) or "images" not in data or "categories" not in data:
            raise ValueError(f"{path}: not a COCO instances file (needs 'images' and 'categories')")
        self.categories = {c["id"]: c["name"] for c in data["categories"]}
        self.images = {}
        for im in data["images"]:
            key = safe_relpath(im["file_name"], str(path))
            self.images[key] = im
        by_id = {im["id"]: key for key, im in self.images.items()}
        self.anns: dict[str, list[dict]] = {k: [] for k in self.images}
        unknown = 0
        for a in data.get("annotations", []):
            key = by_id.get(a.get("image_id"))
            if key is None or a.get("category_id") not in self.categories:
                unknown += 1
                continue
            self.anns[key].append(a)
        if unknown:
            logger.warning("%s: %d annotations with unknown image or category ids skipped", path, unknown)
        #: annotations skipped because their image or category id is not in the file
        self.num_unknown_annotations = unknown
        self.label_names = [self.categories[c] for c in sorted(self.categories)]
        self._cat_index = {c: i for i, c in enumerate(sorted(self.categories))}

    def keys(self) -> list[str]:
        return sorted(self.images)

    def config(self) -> dict[str, Any]:
        """Plain-dict recipe that `annotations_from_config` turns back into this object
        (used by worker processes and Ray actors)."""
        return {"kind": "coco", "path": str(self.path)}

    def fingerprint(self) -> dict[str, Any]:
        """`config` plus the file's sha256: identifies the annotations of a build."""
        h = hashlib.sha256()
        with open(self.path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return {**self.config(), "sha256": h.hexdigest()}

    def instance_masks(self, key: str, shape: tuple[int, int]) -> list[tuple[np.ndarray, int, bool]]:
        """(mask (H, W) bool, label index, iscrowd) for each annotation of an image; polygons
        outside the image are clipped."""
        H, W = shape
        out = []
        for a in self.anns.get(key, []):
            seg = a.get("segmentation")
            if isinstance(seg, list):
                mask = np.zeros((H, W), bool)
                for poly in seg:
                    try:
                        xy = np.asarray(poly, np.float64).reshape(-1, 2)
                    except (TypeError, ValueError):
                        logger.warning("%s: malformed polygon of annotation %s skipped", key, a.get("id"))
                        continue
                    if len(xy) < 3 or not np.isfinite(xy).all():
                        continue
                    # vertices outside the image are clipped to it (shape=...)
                    rr, cc = draw_polygon(xy[:, 1], xy[:, 0], shape=(H, W))
                    mask[rr, cc] = True
            elif isinstance(seg, dict):
                h, w = seg.get("size", (H, W))
                try:
                    mask = decode_coco_rle(seg, h, w)
                except (KeyError, TypeError, ValueError, IndexError) as exc:
                    logger.warning("%s: malformed RLE of annotation %s skipped (%s)", key, a.get("id"), exc)
                    continue
                if mask.shape != (H, W):
                    logger.warning("%s: RLE of size %s for an image of size %s skipped", key, mask.shape, (H, W))
                    continue
            else:
                continue
            out.append((mask, self._cat_index[a["category_id"]], bool(a.get("iscrowd", 0))))
        return out

    def label_map(self, key: str, shape: tuple[int, int]) -> np.ndarray:
        """(H, W) int32 GT map: label index, -1 unlabelled or crowd. Crowd regions are painted
        first, then instances largest first so small objects stay on top (as make_coco_masks)."""
        lab = np.full(shape, -1, np.int32)
        inst = self.instance_masks(key, shape)
        for mask, _, crowd in inst:
            if crowd:
                lab[mask] = -2
        for mask, li, crowd in sorted((x for x in inst if not x[2]), key=lambda x: -int(x[0].sum())):
            lab[mask] = li
        lab[lab == -2] = -1
        return lab


class MaskFolder:
    """Index-PNG masks beside images: ``masks/<same relative path>.png`` per image.

    Args:
        mask_root: folder of masks mirroring the image folder (same stems).
        label_names: one name per label index (``classes.txt`` lines).
        ignore_index: mask value treated as unlabelled (default 255).
    """

    def __init__(self, mask_root: str | Path, label_names: list[str], ignore_index: int = 255):
        self.mask_root = Path(mask_root)
        if not self.mask_root.is_dir():
            raise FileNotFoundError(f"mask folder not found: {self.mask_root}")
        self.label_names = list(label_names)
        self.ignore_index = ignore_index

    def config(self) -> dict[str, Any]:
        """Plain-dict recipe for `annotations_from_config` (worker processes, Ray)."""
        return {"kind": "masks", "mask_root": str(self.mask_root.resolve()), "label_names": list(self.label_names),
                "ignore_index": int(self.ignore_index)}

    def fingerprint(self) -> dict[str, Any]:
        """Identifies the annotations of a build (the mask files themselves are not hashed)."""
        return self.config()

    def mask_path(self, key: str) -> Path:
        return self.mask_root / PurePosixPath(key).with_suffix(".png")

    def label_map(self, key: str, shape: tuple[int, int]) -> np.ndarray:
        """(H, W) int32 GT map (-1 = ignore or out-of-range value)."""
        path = self.mask_path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no mask for image {key}: {path}")
        m = np.array(Image.open(path)).astype(np.int32)
        if m.shape != tuple(shape):
            raise ValueError(f"mask {path} has shape {m.shape}, image has {tuple(shape)}")
        m[(m == self.ignore_index) | (m >= len(self.label_names))] = -1
        return m


#: YOLO coordinates are normalised to [0, 1]; values this far outside are taken as an error
#: (pixel coordinates, a wrong format), values closer are clipped to the image.
YOLO_COORD_TOLERANCE = 0.01


def read_yolo_labels(path: str | Path, num_classes: int) -> list[tuple[int, str, np.ndarray]]:
    """Parse one YOLO label file: one instance per line.

    Lines are ``cls cx cy w h`` (exactly 5 numbers: a box, Ultralytics' detection format) or
    ``cls x1 y1 x2 y2 ... xn yn`` (n >= 3 polygon vertices, Ultralytics' YOLO-seg format).
    Coordinates are normalised by the image width (x) and height (y). Blank lines are skipped.

    Args:
        path: the ``.txt`` file.
        num_classes: number of class names; ``cls`` must be an integer in [0, num_classes).

    Returns:
        One ``(cls, kind, coords)`` per instance in file order: ``kind`` is ``"box"`` with
        ``coords`` float64 (4,) = (cx, cy, w, h), or ``"polygon"`` with ``coords`` float64 (n, 2)
        = (x, y) vertices; all normalised.

    Raises:
        ValueError: a malformed line (not numbers, a non-integer or out-of-range class, an even
            number of values or fewer than 3 vertices, non-finite or non-normalised coordinates,
            a negative box size); the message names the file and the 1-based line number.
    """
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}, line {n}"
        try:
            vals = np.array([float(x) for x in parts], np.float64)
        except ValueError:
            raise ValueError(f"{where}: not a YOLO label line (numbers expected): {line.strip()[:80]!r}") from None
        c = vals[0]
        if not (np.isfinite(c) and c == int(c) and 0 <= c < num_classes):
            raise ValueError(f"{where}: class {parts[0]!r} is not an integer in [0, {num_classes}) "
                             f"({num_classes} class names given)")
        xy = vals[1:]
        if len(xy) == 4:
            kind = "box"
        elif len(xy) >= 6 and len(xy) % 2 == 0:
            kind = "polygon"
        else:
            raise ValueError(f"{where}: {len(parts)} values; expected 'cls cx cy w h' (5) or "
                             "'cls x1 y1 ... xn yn' with n >= 3 vertices (an odd count >= 7)")
        tol = YOLO_COORD_TOLERANCE
        if not np.isfinite(xy).all() or (xy < -tol).any() or (xy > 1 + tol).any():
            raise ValueError(f"{where}: coordinates must be finite and normalised to [0, 1] "
                             f"(found {xy.min():g} .. {xy.max():g})")
        if kind == "box" and (xy[2] < 0 or xy[3] < 0):
            raise ValueError(f"{where}: negative box width or height")
        out.append((int(c), kind, xy if kind == "box" else xy.reshape(-1, 2)))
    return out


def rasterise_yolo_instance(kind: str, coords: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of one YOLO instance (see `read_yolo_labels`) at the image size.

    Pixel (r, c) covers [c, c+1) x [r, r+1) in image coordinates (x = coordinate * W) and is
    inside when its centre is: polygons through `skimage.draw.polygon` (the rasteriser of
    `CocoInstances`), boxes as filled rectangles. The pixel count then follows the
    polygon's area (shoelace formula) up to edge pixels, with no outline added.
    """
    H, W = shape
    mask = np.zeros((H, W), bool)
    if kind == "box":
        cx, cy, w, h = coords
        x0, x1 = np.ceil(np.array([cx - w / 2, cx + w / 2]) * W - 0.5).clip(0, W).astype(int)
        y0, y1 = np.ceil(np.array([cy - h / 2, cy + h / 2]) * H - 0.5).clip(0, H).astype(int)
        mask[y0:y1, x0:x1] = True
    else:
        rr, cc = draw_polygon(coords[:, 1] * H - 0.5, coords[:, 0] * W - 0.5, shape=(H, W))
        mask[rr, cc] = True
    return mask


class YoloLabels:
    """YOLO label files beside images: ``<label_root>/<same relative path>.txt`` per image.

    Lines are YOLO-seg polygons (``cls x1 y1 ... xn yn``) or YOLO boxes (``cls cx cy w h``),
    normalised to [0, 1], with ``cls`` the 0-based line of the class-name file
    (`read_yolo_labels`). Box lines are **weak labels**: every pixel of the box, object
    or not, gets the box's class. In GT mode a proposal keeps a label only when it covers at
    least ``min_purity`` of it; the group-median filter of docs/method.md step 7, which is meant
    for such noise, is not run on GT-mode builds.

    An image without a label file has no annotated pixels (all -1; with
    ``build_gt_reference(background_label=...)`` they become that label, as unannotated pixels
    of the other sources). Label files without an image are ignored.

    Args:
        label_root: folder of ``.txt`` files mirroring the image folder (same stems).
        label_names: one name per class index (``classes.txt`` lines).

    Raises:
        FileNotFoundError: ``label_root`` is not a folder.
        ValueError: no ``.txt`` file under ``label_root`` (probably the wrong folder), or no
            label names.
    """

    def __init__(self, label_root: str | Path, label_names: list[str]):
        self.label_root = Path(label_root)
        if not self.label_root.is_dir():
            raise FileNotFoundError(f"YOLO label folder not found: {self.label_root}")
        if next(self.label_root.rglob("*.txt"), None) is None:
            raise ValueError(f"no YOLO label files (*.txt) under {self.label_root}")
        self.label_names = list(label_names)
        if not self.label_names:
            raise ValueError("YOLO labels need at least one class name")

    def config(self) -> dict[str, Any]:
        """Plain-dict recipe for `annotations_from_config` (worker processes, Ray)."""
        return {"kind": "yolo", "label_root": str(self.label_root.resolve()), "label_names": list(self.label_names)}

    def fingerprint(self) -> dict[str, Any]:
        """Identifies the annotations of a build (the label files themselves are not hashed)."""
        return self.config()

    def label_path(self, key: str) -> Path:
        return self.label_root / PurePosixPath(key).with_suffix(".txt")

    def instance_masks(self, key: str, shape: tuple[int, int]) -> list[tuple[np.ndarray, int, bool]]:
        """(mask (H, W) bool, label index, iscrowd=False) per line of the image's label file, in
        file order; [] when the image has no label file.

        Raises:
            ValueError: a malformed line (`read_yolo_labels`).
        """
        path = self.label_path(key)
        if not path.is_file():
            logger.debug("no YOLO label file for %s (%s): no annotated pixels", key, path)
            return []
        return [(rasterise_yolo_instance(kind, xy, shape), c, False)
                for c, kind, xy in read_yolo_labels(path, len(self.label_names))]

    def label_map(self, key: str, shape: tuple[int, int]) -> np.ndarray:
        """(H, W) int32 GT map: class index, -1 unlabelled. Instances are painted largest
        first so small objects stay on top (as `CocoInstances.label_map`).

        Raises:
            ValueError: a malformed line of the label file, named with its line number (a build
                skips that image and records the reason in ``manifest["skipped_images"]``).
        """
        lab = np.full(shape, -1, np.int32)
        for mask, li, _ in sorted(self.instance_masks(key, shape), key=lambda x: -int(x[0].sum())):
            lab[mask] = li
        return lab


def _read_text(path: str | Path, what: str) -> str:
    """UTF-8 text of ``path``; ValueError naming the file when it is binary or not UTF-8."""
    data = Path(path).read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{path}: not a text file (it holds NUL bytes); expected {what}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); expected {what}") from None


def read_json_file(path: str | Path) -> Any:
    """Parse a JSON file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: binary, not UTF-8, or not valid JSON; the message names the file, line and
            column.
    """
    text = _read_text(path, "a JSON file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def read_class_names(path: str | Path) -> list[str]:
    """The class name of each line (UTF-8 text; line k names mask value k - 1; the first
    synonym of a line, `reme.classes.read_class_file` with ``indexed=True``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is binary or not UTF-8, holds no class name, or has a blank line
            before its last class (it would shift the later values); the message names the
            file and the line.
    """
    from reme.classes import parse_class_lines

    try:  # line k names value k - 1: a blank line is an error naming it (reme.classes grammar)
        return [c[0] for c in parse_class_lines(_read_text(path, "class names, one per line").splitlines(), indexed=True)]
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def annotations_from_config(config: dict[str, Any]):
    """Rebuild annotations from `CocoInstances.config` / `MaskFolder.config` / `YoloLabels.config`.

    Raises:
        ValueError: unknown ``kind``.
    """
    kind = config.get("kind")
    if kind == "coco":
        return CocoInstances(config["path"])
    if kind == "masks":
        return MaskFolder(config["mask_root"], config["label_names"], config.get("ignore_index", 255))
    if kind == "yolo":
        return YoloLabels(config["label_root"], config["label_names"])
    raise ValueError(f"unknown annotations kind {kind!r}; expected 'coco', 'masks' or 'yolo'")
