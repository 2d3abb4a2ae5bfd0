"""Benchmark class-name files: one class per line, in reme's one class-list grammar
(`reme.classes`: synonyms after ``;`` or, in a file, ``,``; parsed by
`reme.classes.read_class_file`, re-exported here).

The benchmark files shipped in ``reme/eval/classnames/`` follow the convention of the
training-free OVS code of this field (SCLIP, ProxyCLIP ``cls_*.txt``): line ``k`` is label
``k`` of the masks (after the dataset's own label shift), its first name is the display name
(the benchmark's official class name) and the others are synonyms whose scores are merged by
max at inference ("person, people, man, woman"). Lines starting with ``#`` and empty lines are
skipped. ``;`` separates synonyms too, so one class of a ``reme segment --classes`` string
("person; people") pasted as a line of a file means the same.

Sources of the lists: the official class names of each benchmark (VOC, PASCAL-Context 59/60
and 459, COCO-Object / COCO-Stuff-171 as in mmseg, Cityscapes trainIds, ADE20K-150 from
``objectInfo150.txt``, ADE20K-847 as in the detectron2 preparation used by CAT-Seg and
ProxyCLIP); synonyms are ours (common English alternatives such as "tvmonitor, tv monitor,
television, monitor, screen"). ADE20K-847 repeats a few names; the later duplicates are
reordered so that their most specific name comes first ("handbag, bag, ...") or, when the
benchmark gives only the bare name, shown as "pot (2)" with "pot" as synonym.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from reme.classes import parse_class_lines, read_class_file  # noqa: F401  (the one parser, re-exported)

#: Folder of the shipped class-name files (package data).
CLASSNAMES_DIR = Path(__file__).resolve().parent / "classnames"


def shipped_class_files() -> dict[str, Path]:
    """Name -> path of every class-name file shipped with reme (``voc21``, ``ade847``, ...)."""
    return {p.stem: p for p in sorted(CLASSNAMES_DIR.glob("*.txt"))}


def benchmark_classes(name: str) -> list[list[str]]:
    """Synonym lists of a shipped benchmark class file.

    Raises:
        ValueError: unknown name (the message lists the shipped files).
    """
    files = shipped_class_files()
    if name not in files:
        raise ValueError(f"no class-name file {name!r}; shipped: {', '.join(files)}")
    return read_class_file(files[name])


def display_names(classes: Sequence[Sequence[str]]) -> list[str]:
    """First name of each class."""
    return [c[0] for c in classes]


def class_queries(classes: Sequence[Sequence[str]], synonyms: bool = True) -> list[str]:
    """Class strings for [`reme.Segmenter.segment_scores`][reme.inference.segmenter.Segmenter.segment_scores]:
    synonyms joined by ``;`` (merged by max at inference); ``synonyms=False`` keeps the display
    names only."""
    return ["; ".join(c) if synonyms else c[0] for c in classes]
