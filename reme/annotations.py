"""Ground-truth annotations for GT-mode reference sets (the paper's Fig. 1b "GT reference").

Two sources: COCO instance JSON (polygons and RLE) and folders of index-PNG masks with a
class-name file (VOC, CamVid, COCO-Object masks). Both give, per image, an (H, W) int32 GT
label map with -1 for unlabelled / ignored pixels, plus the label names.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from skimage.draw import polygon as draw_polygon

logger = logging.getLogger(__name__)


def _safe_relpath(name: str, where: str) -> str:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"{where}: path {name!r} escapes the image root (absolute or '..'); refusing it")
    return str(p)


def decode_coco_rle(rle: dict, height: int, width: int) -> np.ndarray:
    """Decode a COCO RLE (``counts`` as list or compressed string) to an (H, W) bool mask.

    Column-major run lengths, as pycocotools (Lin et al., ECCV 2014, COCO format).
    """
    counts = rle["counts"]
    if isinstance(counts, str):  # compressed: 5-bit groups, LEB128-like, delta-coded after the 3rd
        vals, i, s = [], 0, counts.encode("ascii")
        while i < len(s):
            x, k, more = 0, 0, True
            while more:
                c = s[i] - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                i += 1
                k += 1
                if not more and (c & 0x10):
                    x |= -1 << (5 * k)
            if len(vals) > 2:
                x += vals[-2]
            vals.append(x)
        counts = vals
    flat = np.zeros(height * width, bool)
    pos, val = 0, False
    for c in counts:
        if val:
            flat[pos:pos + c] = True
        pos += c
        val = not val
    return flat.reshape(width, height).T


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
            key = _safe_relpath(im["file_name"], str(path))
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
        """Plain-dict recipe that :func:`annotations_from_config` turns back into this object
        (used by worker processes and Ray actors)."""
        return {"kind": "coco", "path": str(self.path)}

    def fingerprint(self) -> dict[str, Any]:
        """:meth:`config` plus the file's sha256: identifies the annotations of a build."""
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
        """Plain-dict recipe for :func:`annotations_from_config` (worker processes, Ray)."""
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
    """One class name per non-empty line (UTF-8 text).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is binary or not UTF-8, or holds no class name; the message names
            the file.
    """
    names = [ln.strip() for ln in _read_text(path, "class names, one per line").splitlines() if ln.strip()]
    if not names:
        raise ValueError(f"{path}: the class list is empty; give one class name per line")
    return names


def annotations_from_config(config: dict[str, Any]):
    """Rebuild annotations from :meth:`CocoInstances.config` / :meth:`MaskFolder.config`.

    Raises:
        ValueError: unknown ``kind``.
    """
    kind = config.get("kind")
    if kind == "coco":
        return CocoInstances(config["path"])
    if kind == "masks":
        return MaskFolder(config["mask_root"], config["label_names"], config.get("ignore_index", 255))
    raise ValueError(f"unknown annotations kind {kind!r}; expected 'coco' or 'masks'")
