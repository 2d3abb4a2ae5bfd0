"""Readers for the benchmarks of docs/method.md in their usual on-disk layouts, plus a generic
images + index-mask reader.

Every reader yields `Sample` records (image path, mask path) and decodes masks to one
internal convention: an (H, W) int64 map with class indices 0..C-1 (line order of the
benchmark's class file) and **-1 for ignored pixels**, whatever the file's own encoding
(255 or 65535 ignore, mmseg's ``reduce_zero_label``, Cityscapes labelIds). The expected
folder trees are in ``docs/evaluation.md``; `BENCHMARKS` holds the same facts as data.

A benchmark may have several accepted layouts (`Layout`); the first whose image and
mask folders exist under ``root`` is used, so the official tree and a flat
``images/`` + ``masks/`` tree (as in ``../shared/data``) both work with ``--dataset NAME``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from reme.eval.names import benchmark_classes, display_names, read_class_file
from reme.io import IMAGE_EXTENSIONS, load_image

logger = logging.getLogger(__name__)

#: Cityscapes labelIds (0..33) -> trainIds (0..18, 255 ignore), from cityscapesScripts'
#: ``labels.py`` (the table every Cityscapes loader uses).
CITYSCAPES_LABELID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


@dataclass(frozen=True)
class Layout:
    """Where a benchmark's files lie under its root.

    Attributes:
        images: image folder relative to the root; ``{split}`` is replaced by the split.
        masks: mask folder relative to the root (same ``{split}`` rule).
        mask_suffix: what replaces the image suffix to give the mask name
            (``".png"``, ``"_instanceTrainIds.png"``, ``"_gtFine_labelTrainIds.png"``).
        image_suffix: suffix of image names (``".jpg"``, ``"_leftImg8bit.png"``); None =
            any image extension (matched by stem).
        split_file: text file of image ids relative to the root (``{split}`` rule); None or
            absent on disk = every mask found under ``masks`` (recursively) with its image.
        label_lut: name of a raw-value lookup table applied to masks
            (``"cityscapes_labelids"``, ``"voc21_background_last"``), or None.
        name: the preparation that writes this tree: ``"mmseg"``, ``"detectron2"`` (ReME's,
            CAT-Seg's and ProxyCLIP's scripts), ``"flat"`` (images/ + masks/); ``"+"``-joined
            when both preparations write it (Cityscapes). ``--layout`` selects by these names.
        reduce_zero_label: the label shift of this tree's masks; None = the benchmark's
            (`BenchmarkSpec.reduce_zero_label`). detectron2 trees store ids already shifted.
    """

    images: str
    masks: str
    mask_suffix: str = ".png"
    image_suffix: str | None = ".jpg"
    split_file: str | None = None
    label_lut: str | None = None
    name: str = "mmseg"
    reduce_zero_label: bool | None = None

    def has_name(self, name: str) -> bool:
        """True when ``name`` is one of the preparations that write this tree."""
        return name in self.name.split("+")


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark: its class file, label conventions, layouts and protocol defaults.

    Attributes:
        name: registry key (``voc21``, ``ade150``, ...).
        title: human-readable name.
        classes: shipped class-file name (``reme/eval/classnames/<classes>.txt``).
        layouts: accepted on-disk layouts, tried in order.
        default_split: split substituted into the layout (``val``, ``validation``).
        reduce_zero_label: mmseg convention: mask value 0 is ignored and k becomes k-1.
        ignore_index: mask value of ignored pixels in the files.
        background_index: class index of the benchmark's background class, or None.
        short_side: short side the image is resized to (protocol of the field).
        felzenszwalb: proposal preset of
            [`reme.proposals.FelzenszwalbParams`][reme.proposals.FelzenszwalbParams] recommended for
            the dataset's style (docs/method.md, step 1).
        homes: folders under a detectron2 datasets root (``$DETECTRON2_DATASETS``) that may
            hold the benchmark (``VOCdevkit/VOC2012``, ...); `load_benchmark` also looks there.
    """

    name: str
    title: str
    classes: str
    layouts: tuple[Layout, ...]
    default_split: str = "val"
    reduce_zero_label: bool = False
    ignore_index: int = 255
    background_index: int | None = None
    short_side: int = 336
    felzenszwalb: str = "default"
    homes: tuple[str, ...] = ()


#: Names `Layout.name` may carry (``reme eval --layout``).
LAYOUT_NAMES = ("mmseg", "detectron2", "flat")

_FLAT = Layout("images", "masks", ".png", None, name="flat")
_VOC12, _VOC10 = ("VOCdevkit/VOC2012",), ("VOCdevkit/VOC2010",)

#: mmseg's trees of VOC 2012 and PASCAL-Context (background = 0).
_VOC_MMSEG = Layout("JPEGImages", "SegmentationClass", ".png", ".jpg", "ImageSets/Segmentation/{split}.txt")
_CONTEXT_MMSEG = Layout("JPEGImages", "SegmentationClassContext", ".png", ".jpg", "ImageSets/SegmentationContext/{split}.txt")


def _detectron2_shifted(images: str, masks: str) -> Layout:
    """The detectron2 tree of a ``reduce_zero_label`` benchmark: PNG masks whose ids are already
    shifted (0 = the first class, 255 = ignore)."""
    return Layout(images, masks, ".png", ".jpg", name="detectron2", reduce_zero_label=False)


#: detectron2's trees of VOC 2012 (VOC-21: background last, VOC-20: no background) and PASCAL-Context 59.
_VOC21_D2 = Layout("JPEGImages", "annotations_detectron2_bg/{split}", label_lut="voc21_background_last",
                   name="detectron2")
_VOC20_D2 = _detectron2_shifted("JPEGImages", "annotations_detectron2/{split}")
_PC59_D2 = _detectron2_shifted("JPEGImages", "annotations_detectron2/pc59_{split}")

#: The ten benchmarks of the paper (docs/method.md). Each lists its accepted trees, tried in order:
#: mmseg's dataset preparation (VOC, Context, COCO, Cityscapes, ADE-150), the detectron2
#: preparation of ReME's, CAT-Seg's and ProxyCLIP's scripts (``annotations_detectron2*``:
#: ids already shifted, VOC-21 with background as the *last* value 20, which the
#: ``voc21_background_last`` table maps to class 0 of ``voc21.txt``; 16-bit TIFF label maps
#: with 65535 = ignore for the 459- and 847-class sets), then a flat images/ + masks/ tree.
BENCHMARKS: dict[str, BenchmarkSpec] = {s.name: s for s in [
    BenchmarkSpec("voc21", "PASCAL VOC 2012 (21 classes, with background)", "voc21", (_VOC_MMSEG, _VOC21_D2, _FLAT),
                  background_index=0, felzenszwalb="voc", homes=_VOC12),
    BenchmarkSpec("voc20", "PASCAL VOC 2012 (20 classes, background ignored)", "voc20", (_VOC_MMSEG, _VOC20_D2, _FLAT),
                  reduce_zero_label=True, felzenszwalb="voc", homes=_VOC12),
    BenchmarkSpec("pc60", "PASCAL-Context 60 (59 classes + background)", "pc60", (_CONTEXT_MMSEG, _FLAT),
                  background_index=0, felzenszwalb="voc", homes=_VOC10),
    BenchmarkSpec("pc59", "PASCAL-Context 59 (background ignored)", "pc59", (_CONTEXT_MMSEG, _PC59_D2, _FLAT),
                  reduce_zero_label=True, felzenszwalb="voc", homes=_VOC10),
    BenchmarkSpec("pc459", "PASCAL-Context 459", "pc459", (
        Layout("JPEGImages", "annotations_detectron2/pc459_{split}", ".tif", ".jpg",
               "ImageSets/SegmentationContext/{split}.txt", name="detectron2"),
        Layout("images", "masks", ".tif", None, name="flat"), _FLAT),
        ignore_index=65535, short_side=448, felzenszwalb="voc", homes=_VOC10),
    BenchmarkSpec("coco_object", "COCO-Object (80 things + background)", "coco_object", (
        Layout("images/{split}2017", "annotations/{split}2017", "_instanceTrainIds.png"),
        Layout("images/{split}2017", "masks/{split}2017", ".png", name="flat"), _FLAT),
        background_index=0, felzenszwalb="coco-stuff", homes=("coco_stuff164k/coco_object", "coco_stuff164k")),
    BenchmarkSpec("coco_stuff171", "COCO-Stuff 164k (171 classes)", "coco_stuff171", (
        Layout("images/{split}2017", "annotations/{split}2017", "_labelTrainIds.png"),
        Layout("images/{split}2017", "annotations_detectron2/{split}2017", ".png", name="detectron2"),
        Layout("images/{split}2017", "masks/{split}2017", ".png", name="flat"), _FLAT),
        felzenszwalb="coco-stuff", homes=("coco_stuff164k",)),
    BenchmarkSpec("cityscapes", "Cityscapes (19 trainId classes)", "cityscapes", (
        Layout("leftImg8bit/{split}", "gtFine/{split}", "_gtFine_labelTrainIds.png", "_leftImg8bit.png",
               name="mmseg+detectron2"),
        Layout("leftImg8bit/{split}", "gtFine/{split}", "_gtFine_labelIds.png", "_leftImg8bit.png",
               label_lut="cityscapes_labelids", name="mmseg+detectron2"), _FLAT),
        short_side=560, felzenszwalb="cityscapes", homes=("cityscapes",)),
    BenchmarkSpec("ade150", "ADE20K SceneParsing (150 classes)", "ade150", (
        Layout("images/{split}", "annotations/{split}", ".png"),
        _detectron2_shifted("images/{split}", "annotations_detectron2/{split}"), _FLAT),
        default_split="validation", reduce_zero_label=True, short_side=448, homes=("ADEChallengeData2016",)),
    BenchmarkSpec("ade847", "ADE20K-Full (847 classes)", "ade847", (
        Layout("images_detectron2/{split}", "annotations_detectron2/{split}", ".tif", name="detectron2"),
        Layout("images", "masks", ".tif", None, name="flat"), _FLAT),
        default_split="validation", ignore_index=65535, short_side=448, homes=("ADE20K_2021_17_01",)),
]}


@dataclass(frozen=True)
class Sample:
    """One evaluation image: ``key`` (relative id), ``image`` and ``mask`` paths."""

    key: str
    image: Path
    mask: Path


@dataclass
class SegDataset:
    """A labelled segmentation dataset ready for `reme.eval.evaluate`.

    Attributes:
        name: benchmark name or ``"generic"``.
        classes: C synonym lists (first name = display name), index = class id.
        samples: the images, sorted by key.
        ignore_index: mask value of ignored pixels in the files.
        reduce_zero_label: file value 0 is ignored and k becomes k-1 (mmseg).
        background_index: class id of the background class, or None.
        label_lut: optional (V,) int64 raw-value -> class-id table (-1 = ignore).
        spec: the `BenchmarkSpec` when the dataset is a known benchmark.
        root: dataset root (informational).
    """

    name: str
    classes: list[list[str]]
    samples: list[Sample]
    ignore_index: int = 255
    reduce_zero_label: bool = False
    background_index: int | None = None
    label_lut: np.ndarray | None = None
    spec: BenchmarkSpec | None = None
    root: Path | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.background_index is not None and not 0 <= self.background_index < len(self.classes):
            raise ValueError(f"background_index {self.background_index} outside [0, {len(self.classes)})")

    @property
    def names(self) -> list[str]:
        """Display names of the C classes."""
        return display_names(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def subset(self, limit: int | None = None, stride: int = 1, offset: int = 0) -> "SegDataset":
        """Skip the first ``offset`` samples, keep every ``stride``-th of the rest, then the
        first ``limit`` of those (deterministic: samples are sorted by key)."""
        if stride < 1 or offset < 0:
            raise ValueError(f"need stride >= 1 and offset >= 0, got stride {stride}, offset {offset}")
        return replace(self, samples=self.samples[offset::stride][:limit])

    def load_image(self, sample: Sample) -> np.ndarray:
        """(H, W, 3) uint8 RGB (``reme.io.load_image``; raises ImageReadError)."""
        return load_image(sample.image)

    def load_mask(self, sample: Sample) -> np.ndarray:
        """(H, W) int64 class ids, -1 = ignore (module docstring).

        Raises:
            FileNotFoundError: no mask file. ValueError: a colour (RGB) mask.
        """
        return decode_mask(read_mask(sample.mask), self.num_classes, ignore_index=self.ignore_index,
                           reduce_zero_label=self.reduce_zero_label, label_lut=self.label_lut)


def read_mask(path: str | Path) -> np.ndarray:
    """Raw label values of an index mask (palette or grey PNG, 8/16-bit PNG or TIFF).

    Returns:
        (H, W) int64 array of the stored values (palette indices for palette PNGs).

    Raises:
        FileNotFoundError: missing file. ValueError: an RGB/RGBA (colour-coded) mask.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    with Image.open(path) as img:
        if img.mode in ("RGB", "RGBA"):
            raise ValueError(f"{path} is a colour ({img.mode}) image; expected an index mask "
                             f"(palette or single-channel PNG/TIFF whose values are class ids)")
        arr = np.array(img)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel mask, got shape {arr.shape}")
    return arr.astype(np.int64)


def decode_mask(raw: np.ndarray, num_classes: int, *, ignore_index: int = 255, reduce_zero_label: bool = False,
                label_lut: np.ndarray | None = None) -> np.ndarray:
    """Raw mask values -> class ids 0..C-1 with -1 for ignored pixels.

    Order: ``label_lut`` (values beyond the table are ignored), then ``ignore_index`` -> -1,
    then ``reduce_zero_label`` (0 -> -1, k -> k-1, as mmseg's ``LoadAnnotations``), then any
    value outside [0, C) -> -1.

    Args:
        raw: (H, W) integer array.
        num_classes: C.
        ignore_index: raw value of ignored pixels.
        reduce_zero_label: mmseg's label shift.
        label_lut: (V,) int table raw -> id (-1 = ignore).

    Returns:
        (H, W) int64.
    """
    m = np.asarray(raw, np.int64)
    if label_lut is not None:
        lut = np.asarray(label_lut, np.int64)
        inside = (m >= 0) & (m < len(lut))
        m = np.where(inside, lut[np.clip(m, 0, len(lut) - 1)], -1)
    else:
        m = np.where(m == ignore_index, -1, m)
    if reduce_zero_label:
        m = np.where(m > 0, m - 1, -1)
    return np.where((m >= 0) & (m < num_classes), m, -1)


def _lut(name: str | None) -> np.ndarray | None:
    if name is None:
        return None
    lut = np.full(256, -1, np.int64)
    if name == "cityscapes_labelids":
        for k, v in CITYSCAPES_LABELID_TO_TRAINID.items():
            lut[k] = v
        return lut
    if name == "voc21_background_last":          # detectron2 VOC-21: 0..19 objects, 20 background
        lut[:20] = np.arange(1, 21)
        lut[20] = 0
        return lut
    raise ValueError(f"unknown label table {name!r}")


def _find_image(folder: Path, rel_base: str, suffix: str | None) -> Path | None:
    if suffix is not None:
        p = folder / (rel_base + suffix)
        return p if p.is_file() else None
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        p = folder / (rel_base + ext)
        if p.is_file():
            return p
    return None


def collect_samples(image_dir: str | Path, mask_dir: str | Path, *, mask_suffix: str = ".png",
                    image_suffix: str | None = None, ids: Sequence[str] | None = None) -> list[Sample]:
    """Pair images with masks.

    With ``ids`` (a split file's lines) image ``<id><image_suffix>`` pairs with mask
    ``<id><mask_suffix>``; without, every file under ``mask_dir`` ending in ``mask_suffix``
    (recursively) pairs with the image of the same relative base name (any image extension
    when ``image_suffix`` is None). Masks without an image are skipped with a warning.

    Returns:
        Samples sorted by key (the relative base name).

    Raises:
        FileNotFoundError: a folder is missing, or no pair is found.
    """
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    for d, what in ((image_dir, "image"), (mask_dir, "mask")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} folder not found: {d}")
    samples, missing = [], []
    if ids is not None:
        for key in ids:
            img = _find_image(image_dir, key, image_suffix)
            mask = mask_dir / (key + mask_suffix)
            if img is None or not mask.is_file():
                missing.append(key)
                continue
            samples.append(Sample(key, img, mask))
    else:
        for mask in sorted(mask_dir.rglob(f"*{mask_suffix}")):
            rel = mask.relative_to(mask_dir).as_posix()
            key = rel[: -len(mask_suffix)]
            img = _find_image(image_dir, key, image_suffix)
            if img is None:
                missing.append(key)
                continue
            samples.append(Sample(key, img, mask))
    if missing:
        logger.warning("%d of %d ids have no image or mask under %s / %s (first: %s)", len(missing),
                       len(missing) + len(samples), image_dir, mask_dir, missing[0])
    if not samples:
        raise FileNotFoundError(f"no image/mask pairs found in {image_dir} and {mask_dir} "
                                f"(mask suffix {mask_suffix!r}, image suffix {image_suffix!r})")
    return sorted(samples, key=lambda s: s.key)


def _layout_dirs(root: Path, layout: Layout, split: str) -> tuple[Path, Path]:
    return root / layout.images.format(split=split), root / layout.masks.format(split=split)


def _layout_conventions(layout: Layout, spec: BenchmarkSpec) -> dict:
    """The mask conventions a layout implies: ``reduce_zero_label``, ``label_lut`` (name)."""
    rz = spec.reduce_zero_label if layout.reduce_zero_label is None else layout.reduce_zero_label
    return {"reduce_zero_label": rz, "label_lut": layout.label_lut}


def _candidate_roots(root: Path, spec: BenchmarkSpec) -> list[Path]:
    """``root`` itself, then each of the benchmark's homes under it that exists."""
    return [root] + [root / h for h in spec.homes if (root / h).is_dir()]


def load_benchmark(name: str, root: str | Path | None = None, *, split: str | None = None,
                   images: str | Path | None = None, masks: str | Path | None = None,
                   classes_file: str | Path | None = None, layout: str | None = None) -> SegDataset:
    """A benchmark of `BENCHMARKS` read from disk.

    Args:
        name: benchmark key (``voc21``, ``voc20``, ``pc60``, ``pc59``, ``pc459``,
            ``coco_object``, ``coco_stuff171``, ``cityscapes``, ``ade150``, ``ade847``).
        root: the benchmark's folder (``VOCdevkit/VOC2012``, ...) or a detectron2 datasets root
            holding it under one of `BenchmarkSpec.homes`.
        split: split name (default: the benchmark's, ``val`` / ``validation``).
        images, masks: explicit folders overriding the layout (the benchmark's label
            conventions, or those of the ``layout`` named, and classes still apply; masks named
            ``<image stem>.png`` or with the first layout's mask suffix).
        classes_file: a class-name file replacing the shipped one (same length required).
        layout: ``"mmseg"``, ``"detectron2"`` or ``"flat"`` (`LAYOUT_NAMES`): only trees of
            that preparation are tried; None = every accepted tree, in order. The one used is
            recorded in ``SegDataset.meta["layout"]``.

    Raises:
        ValueError: unknown benchmark or layout, or a class file of the wrong length.
        FileNotFoundError: no accepted layout under ``root`` (the message lists them).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} (or 'generic')")
    spec = BENCHMARKS[name]
    layouts = spec.layouts
    if layout is not None:
        layouts = tuple(lay for lay in spec.layouts if lay.has_name(layout))
        if not layouts:
            known = sorted({n for lay in spec.layouts for n in lay.name.split("+")})
            raise ValueError(f"{name} has no {layout!r} layout; it has: {', '.join(known)}")
    split = split or spec.default_split
    classes = benchmark_classes(spec.classes)
    if classes_file is not None:
        own = read_class_file(classes_file)
        if len(own) != len(classes):
            raise ValueError(f"{classes_file} lists {len(own)} classes; {name} has {len(classes)}")
        classes = own
    chosen: Layout | None = None
    if images is not None or masks is not None:
        if images is None or masks is None:
            raise ValueError("give both images and masks folders, or neither")
        image_dir, mask_dir = Path(images), Path(masks)
        suffix = layouts[0].mask_suffix
        if not any(mask_dir.rglob(f"*{suffix}")):
            suffix = ".png" if any(mask_dir.rglob("*.png")) else ".tif"
        chosen = replace(layouts[0], images=str(image_dir), masks=str(mask_dir), mask_suffix=suffix,
                         image_suffix=None, split_file=None)
        samples = collect_samples(image_dir, mask_dir, mask_suffix=suffix)
        root = Path(root) if root else image_dir.parent
    else:
        if root is None:
            raise ValueError(f"give the dataset root of {name} (or images and masks folders)")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {root}")
        tried = []
        samples = []
        for base in _candidate_roots(root, spec):
            for lay in layouts:
                image_dir, mask_dir = _layout_dirs(base, lay, split)
                tried.append(f"{image_dir.relative_to(root)} + {mask_dir.relative_to(root)}/*{lay.mask_suffix}")
                if not (image_dir.is_dir() and mask_dir.is_dir() and any(mask_dir.rglob(f"*{lay.mask_suffix}"))):
                    continue
                ids = None
                if lay.split_file:
                    split_path = base / lay.split_file.format(split=split)
                    if split_path.is_file():
                        ids = [ln.strip() for ln in split_path.read_text().splitlines() if ln.strip()]
                samples = collect_samples(image_dir, mask_dir, mask_suffix=lay.mask_suffix,
                                          image_suffix=lay.image_suffix, ids=ids)
                chosen, root = lay, base
                break
            if chosen is not None:
                break
        if chosen is None:
            raise FileNotFoundError(f"no {name} layout found under {root} (split {split!r}); tried: "
                                    + "; ".join(tried) + " (see docs/evaluation.md)")
    conv = _layout_conventions(chosen, spec)
    logger.info("%s: %d images from %s (%s layout %s + %s)", name, len(samples), root, chosen.name, chosen.images,
                chosen.masks)
    return SegDataset(name=name, classes=classes, samples=samples, ignore_index=spec.ignore_index,
                      reduce_zero_label=conv["reduce_zero_label"], background_index=spec.background_index,
                      label_lut=_lut(conv["label_lut"]), spec=spec, root=root,
                      meta={"split": split, "layout": {"name": chosen.name, "images": chosen.images,
                                                       "masks": chosen.masks, "mask_suffix": chosen.mask_suffix,
                                                       "ignore_index": spec.ignore_index, **conv}})


def load_generic(images: str | Path, masks: str | Path, classes_file: str | Path, *, ignore_index: int = 255,
                 reduce_zero_label: bool = False, background: str | None = None,
                 mask_suffix: str | None = None, name: str = "generic") -> SegDataset:
    """Generic dataset: an images folder, a masks folder of index masks with the same
    relative stems, and a class-name file (line k = mask value k after the label shift).

    Args:
        images: image folder (searched recursively).
        masks: mask folder mirroring it (``<stem>.png``, else ``<stem>.tif``).
        classes_file: class names, synonyms separated by commas (`reme.eval.names`).
        ignore_index: mask value of ignored pixels (default 255).
        reduce_zero_label: ignore value 0 and shift the others down by one.
        background: display name of a background class to treat as such (threshold
            protocol), e.g. ``"background"``; None = no background class.
        mask_suffix: mask name suffix (default ``.png``, else ``.tif`` if only those exist).
        name: dataset name in reports.

    Raises:
        FileNotFoundError: folders or pairs missing. ValueError: unknown background name.
    """
    classes = read_class_file(classes_file)
    masks = Path(masks)
    if mask_suffix is None:
        mask_suffix = ".png" if (not masks.is_dir() or any(masks.rglob("*.png"))) else ".tif"
    samples = collect_samples(images, masks, mask_suffix=mask_suffix)
    bg = None
    if background:
        lowered = [c[0].lower() for c in classes]
        if background.lower() not in lowered:
            raise ValueError(f"background class {background!r} is not in {classes_file}")
        bg = lowered.index(background.lower())
    return SegDataset(name=name, classes=classes, samples=samples, ignore_index=ignore_index,
                      reduce_zero_label=reduce_zero_label, background_index=bg, root=Path(images),
                      meta={"images": str(images), "masks": str(masks), "classes_file": str(classes_file)})
