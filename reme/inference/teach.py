"""Teach by example from annotated photos: the loop behind ``reme add-examples --images``.

For each photo with a ground-truth label map (index masks, COCO instances or YOLO labels,
read as ``reme build-reference``'s GT mode reads them), the proposals whose majority label
covers ``min_purity`` of them are added to the Segmenter's overlay
([`Segmenter.add_examples`][reme.inference.segmenter.Segmenter.add_examples]), saving the
overlay every ``save_every`` photos. Photos already in the overlay are skipped, so a re-run
after an interruption continues where it stopped; every save is a transaction
([`Overlay.save`][reme.reference.overlay.Overlay.save]), so several processes may teach one
overlay folder at once without losing rows.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from reme.classes import looks_void
from reme.errors import ImageReadError

logger = logging.getLogger(__name__)

#: Photos between two saves of `teach_from_annotations` (0 = only at the end).
DEFAULT_SAVE_EVERY = 10


@dataclass
class TeachStats:
    """What `teach_from_annotations` did (JSON-ready with `as_dict`).

    Attributes:
        images: photos given; images_added: photos that added rows; images_skipped: photos
        already in the overlay; images_without_pieces: photos with no proposal pure enough;
        images_unreadable: photos that could not be decoded (skipped, named in ``unreadable``);
        rows_added: overlay rows this call added; left_out: labels not taught (excluded or
        void-like); seconds_per_image: wall time per photo processed.
    """

    images: int = 0
    images_added: int = 0
    images_skipped: int = 0
    images_without_pieces: int = 0
    images_unreadable: int = 0
    rows_added: int = 0
    left_out: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    seconds_per_image: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "unreadable"}


class TeachInterrupted(KeyboardInterrupt):
    """Ctrl-C during `teach_from_annotations`; the rows added so far are saved. ``stats``
    holds what was done."""

    def __init__(self, stats: TeachStats):
        super().__init__("interrupted; the examples added so far are saved")
        self.stats = stats


def labels_to_leave_out(label_names: Sequence[str], *, exclude: Sequence[str] = (),
                        include: Sequence[str] = ()) -> list[str]:
    """Labels of ``label_names`` not to teach: those in ``exclude``, and those that look like
    "unlabelled" (`reme.classes.looks_void`: void, ignore, ...) unless in
    ``include`` (each of these is warned about once, UserWarning). Case-insensitive."""
    ex = {x.casefold() for x in exclude}
    inc = {x.casefold() for x in include}
    out = []
    for name in label_names:
        if name.casefold() in ex:
            out.append(name)
        elif looks_void(name) and name.casefold() not in inc:
            warnings.warn(f"class {name!r} looks like 'unlabelled'; its pixels are not taught (pass "
                          f"include=[{name!r}], CLI --include-label {name!r}, to teach it as a class)",
                          UserWarning, stacklevel=3)
            out.append(name)
    return out


def example_label_map(ann, key: str, shape: tuple[int, int], leave_out: Sequence[str]) -> np.ndarray:
    """(H, W) int32 GT label map of one photo: label ids into ``ann.label_names``, -1 where
    unlabelled or the label is in ``leave_out``.

    Raises:
        ValueError: a mask of another size, or (index masks) a value with no line in the class
            file. FileNotFoundError: no mask for the photo.
    """
    from PIL import Image

    from reme.build.annotations import MaskFolder

    lm = ann.label_map(key, shape)
    if isinstance(ann, MaskFolder):  # MaskFolder reads unknown values as unlabelled; here they are an error
        raw = np.array(Image.open(ann.mask_path(key)))
        bad = np.unique(raw[(raw != ann.ignore_index) & (raw >= len(ann.label_names))])
        if bad.size:
            raise ValueError(f"mask {ann.mask_path(key)} has value(s) {bad.tolist()[:5]} with no line in the class file "
                             f"({len(ann.label_names)} classes, ignore value {ann.ignore_index})")
    drop = set(leave_out)
    for i, name in enumerate(ann.label_names):
        if name in drop:
            lm[lm == i] = -1
    return lm


def teach_from_annotations(seg, images: str | Path, ann, keys: Sequence[str], *, min_purity: float = 0.5,
                           save_every: int = DEFAULT_SAVE_EVERY, exclude: Sequence[str] = (),
                           include: Sequence[str] = (), progress: bool = False,
                           on_unreadable: Callable[[str, Exception], None] | None = None) -> TeachStats:
    """Add the GT pieces of every photo not yet in ``seg``'s overlay; resumable, saved as it goes.

    Args:
        seg: a [`Segmenter`][reme.inference.segmenter.Segmenter] whose overlay has a folder
            (``Segmenter(..., overlay=DIR)``).
        images: the photo folder; ``keys`` are paths relative to it.
        ann: annotations (`reme.build.annotations.MaskFolder`, ``CocoInstances`` or
            ``YoloLabels``): ``label_names`` and ``label_map(key, shape)``.
        keys: the photos, in the order to add them.
        min_purity: a proposal is added when its majority label covers this fraction of it, in (0, 1].
        save_every: save after every this many photos that added rows (0 = only at the end).
        exclude: label names never taught; include: void-like names to teach anyway
            (`labels_to_leave_out`).
        progress: show a progress bar.
        on_unreadable: called with (key, error) for a photo that cannot be decoded (skipped);
            default: a warning in the log.

    Returns:
        [`TeachStats`][reme.inference.teach.TeachStats].

    Raises:
        TeachInterrupted: Ctrl-C; the rows added before it are saved.
        ValueError, FileNotFoundError: a mask that does not fit its photo or is missing; the
            rows added before it are saved and the message names the photo.
        ValueError: ``min_purity`` outside (0, 1], ``save_every`` < 0, or no overlay folder.
    """
    from tqdm.auto import tqdm

    from reme.checks import check_range
    from reme.io import read_image

    check_range(min_purity, "min_purity", 0.0, 1.0, lo_open=True)
    if int(save_every) < 0:
        raise ValueError(f"save_every must be >= 0, got {save_every}")
    if seg.overlay.path is None:
        raise ValueError("the Segmenter's overlay has no folder; construct it with overlay=DIR")
    images = Path(images)
    leave_out = labels_to_leave_out(ann.label_names, exclude=exclude, include=include)
    mine: set[str] = set()                                   # example ids this call added
    done = set(seg.overlay.images)
    todo = [k for k in keys if k not in done]
    stats = TeachStats(images=len(keys), images_skipped=len(keys) - len(todo), left_out=list(leave_out))

    def rows_mine() -> int:
        return sum(e in mine for e in seg.overlay.example_ids)

    def save() -> None:
        seg.save_overlay()
        stats.rows_added = rows_mine()

    since_save, t0 = 0, time.perf_counter()
    try:
        for key in tqdm(todo, desc="add examples", unit="img", disable=not progress):
            try:
                img, _ = read_image(images / key)
            except ImageReadError as exc:
                stats.images_unreadable += 1
                stats.unreadable.append(key)
                (on_unreadable or (lambda k, e: logger.warning("skipping %s: %s", k, e)))(key, exc)
                continue
            try:
                lm = example_label_map(ann, key, img.shape[:2], leave_out)
                eid = seg.add_examples(img, lm, ann.label_names, min_purity=min_purity, image_name=key)
            except (FileNotFoundError, ValueError) as exc:
                if mine:
                    save()
                raise type(exc)(f"{key}: {exc}" + (" (the examples added before it are saved; a re-run continues)"
                                                   if mine else "")) from None
            if not eid:
                stats.images_without_pieces += 1
                continue
            mine.add(eid)
            stats.images_added += 1
            since_save += 1
            if save_every and since_save >= save_every:
                save()
                since_save = 0
    except KeyboardInterrupt:
        if mine:
            save()
        raise TeachInterrupted(stats) from None
    stats.seconds_per_image = round((time.perf_counter() - t0) / max(len(todo), 1), 3)
    if since_save or not (Path(seg.overlay.path) / "manifest.json").is_file():
        save()
    stats.rows_added = rows_mine()
    return stats
