"""The class-list grammar of reme, one parser for ``reme segment``, ``reme eval``, the demo,
class-name files and the Python API.

Grammar (`CLASS_LIST_GRAMMAR`, quoted by every ``--classes`` / ``--classes-file`` help):

* **Classes**: one per line (a class file, or any multi-line text), or one per comma in a
  one-line list (``--classes "person; people, car, dog"``). A Python sequence holds one class
  per item.
* **Synonyms** of one class are separated by ``;``; in a one-class-per-line list (a file) ``,``
  separates synonyms too, as in the SCLIP / ProxyCLIP ``cls_*.txt`` files the shipped benchmark
  lists follow. The first name is the display name; all names are queried and their scores
  merged by max at inference.
* Names are stripped and inner whitespace is collapsed; repeated synonyms are dropped. In a
  file, blank lines and lines starting with ``#`` are skipped, and line k (counting only class
  lines) is class k.
* Errors (ValueError, naming the entry or line): an empty list, an empty class (``"cat,,dog"``),
  or two classes with the same display name (case-insensitive).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

#: The grammar in one sentence, used verbatim in the CLI help of --classes / --classes-file and
#: in the docs.
CLASS_LIST_GRAMMAR = ("one class per comma in a string, one per line in a file; ';' separates the synonyms of "
                      "a class (in a file ',' too); the first name is shown, synonym scores are merged by max")


def _names(text: str, seps: str) -> list[str]:
    for s in seps[1:]:
        text = text.replace(s, seps[0])
    return list(dict.fromkeys(n for n in (" ".join(x.split()) for x in text.split(seps[0])) if n))


def _check_unique(classes: list[list[str]], where: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, syns in enumerate(classes):
        key = syns[0].lower()
        if key in seen:
            raise ValueError(f"class {syns[0]!r} appears twice ({where[seen[key]]} and {where[i]})")
        seen[key] = i


def parse_class_lines(lines: Sequence[str]) -> list[list[str]]:
    """Classes of a one-class-per-line list (a class file): synonyms after ``;`` or ``,``.

    Args:
        lines: text lines; ``#`` comments and blank lines are skipped.

    Returns:
        One synonym list per class, the display name first.

    Raises:
        ValueError: no class at all, a line with separators but no name, or two classes with
            the same display name (case-insensitive); the message names the lines.
    """
    out: list[list[str]] = []
    where: list[str] = []
    for num, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        names = _names(line, ";,")
        if not names:
            raise ValueError(f"line {num} holds no class name: {raw!r}")
        out.append(names)
        where.append(f"line {num}")
    if not out:
        raise ValueError("the class list is empty; give at least one class name")
    _check_unique(out, where)
    return out


def parse_class_text(text: str) -> list[list[str]]:
    """Classes of a class-list string (module grammar): a one-line string holds one class per
    comma, a multi-line one one class per line (`parse_class_lines`).

    Raises:
        ValueError: see the module docstring.
    """
    if len([ln for ln in text.splitlines() if ln.strip()]) > 1:
        return parse_class_lines(text.splitlines())
    items = text.strip().split(",")
    if not any(i.strip() for i in items):
        raise ValueError("the class list is empty; give at least one class name, e.g. 'cat,dog'")
    out = []
    for pos, item in enumerate(items):
        names = _names(item, ";")
        if not names:
            raise ValueError(f"class #{pos + 1} is empty in {text!r}")
        out.append(names)
    _check_unique(out, [f"entries #{i + 1}" for i in range(len(out))])
    return out


def read_class_file(path: str | Path) -> list[list[str]]:
    """Read a class file (one class per line, module grammar); see `parse_class_lines`.

    Raises:
        FileNotFoundError: no such file. ValueError: not UTF-8 text, or malformed; the message
            names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path}")
    try:
        return parse_class_lines(path.read_text(encoding="utf-8").splitlines())
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file of class names ({exc.reason})") from exc
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def parse_classes(classes: str | Sequence[str] | Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """Validate a class list and split synonyms (module grammar).

    A class is a free-form string ("a small brown dog").

    Args:
        classes: a class-list string (one class per comma, or per line); a sequence with one
            class per item (``;`` separates synonyms inside an item); or a sequence of synonym
            lists (as `read_class_file` returns).

    Returns:
        ``(names, synonyms)``: the display name of each class (its first synonym) and, per
        class, the list of its synonym strings.

    Raises:
        ValueError: the list is empty, a class is empty, an item is not a string, or a class
            appears twice (case-insensitive); the message names the offending entry.
    """
    if isinstance(classes, str):
        out = parse_class_text(classes)
        return [c[0] for c in out], out
    items = list(classes)
    if not items:
        raise ValueError("the class list is empty; give at least one class name, e.g. 'cat,dog'")
    out = []
    for pos, item in enumerate(items):
        if isinstance(item, str):
            names = _names(item, ";")
        elif isinstance(item, (list, tuple)) and all(isinstance(n, str) for n in item):
            names = list(dict.fromkeys(" ".join(n.split()) for n in item if n.strip()))
        else:
            raise ValueError(f"classes must be strings, got {items!r}")
        if not names:
            if all(isinstance(i, str) and not i.strip() for i in items):
                raise ValueError("the class list is empty; give at least one class name, e.g. 'cat,dog'")
            raise ValueError(f"class #{pos + 1} is empty in {items!r}")
        out.append(names)
    _check_unique(out, [f"entries #{i + 1}" for i in range(len(out))])
    return [c[0] for c in out], out
