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
* Names are stripped and inner whitespace is collapsed; repeated synonyms are dropped. Empty
  entries -- a trailing comma (``"sky, tree,"``), ``"cat,,dog"``, an empty synonym
  (``"sky; ;clouds"``) -- are ignored with a warning (``UserWarning``), the same everywhere. In a
  class-list file, blank lines and lines starting with ``#`` are skipped, and line k (counting
  only class lines) is class k.
* A **class file for masks or YOLO labels** (``read_class_file(path, indexed=True)``) names the
  mask value of each line by position (line 1 = value 0): a blank or ``#`` line before the
  last class is an error naming the line, since skipping it would give every later value the
  next name.
* Errors (ValueError, naming the entry or line): an empty list, a name with a control character
  or longer than `MAX_LABEL_CHARS`, or two classes with the same display name
  (case-insensitive).
* **Labels** taught by example (`check_label`: the CLI, the Python API and the demo) follow the
  same rules and may not contain ``,`` or ``;`` (a label must be askable in a class list).
  Labels equal but for case are one label (the overlay keeps the first spelling).
* Names that usually mean "unlabelled" (`VOID_NAMES`: void, ignore, unlabelled, ...) are not
  taught from masks unless asked for (``reme add-examples --include-label``).
"""

from __future__ import annotations

import unicodedata
import warnings
from pathlib import Path
from typing import Sequence

#: Longest class name or label, in characters.
MAX_LABEL_CHARS = 100

#: Names (case-insensitive, spaces/underscores/hyphens ignored) that mark unlabelled pixels in
#: common datasets rather than a class; `looks_void` tests them.
VOID_NAMES = frozenset({"void", "ignore", "ignored", "unlabelled", "unlabeled", "unknown", "dontcare",
                        "donotcare", "none", "null", "nolabel", "undefined", "unannotated"})


def looks_void(name: str) -> bool:
    """True for a name that usually means "unlabelled" (`VOID_NAMES`), e.g. ``"void"``,
    ``"Unlabeled"``, ``"dont_care"``."""
    key = "".join(ch for ch in name.casefold() if ch.isalnum())
    return key in VOID_NAMES or key == "dontcare"


def _check_name(name: str, where: str) -> str:
    """``name`` when it has no control character and at most `MAX_LABEL_CHARS` characters."""
    bad = [ch for ch in name if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn")]
    if bad:
        raise ValueError(f"{where}: {name[:40]!r} holds a control character ({bad[0]!r})")
    if len(name) > MAX_LABEL_CHARS:
        raise ValueError(f"{where}: a name of {len(name)} characters; at most {MAX_LABEL_CHARS}")
    return name


def check_label(label: str) -> str:
    """A label as stored in an overlay: white space stripped and collapsed, checked against the
    class-list grammar (module docstring), so that any stored label can be asked for.

    Args:
        label: the label text (``"coffee cup"``).

    Returns:
        The normalised label.

    Raises:
        ValueError: not a string, empty, containing ``,`` or ``;`` (class and synonym
            separators) or a control character, or longer than `MAX_LABEL_CHARS`.
    """
    if not isinstance(label, str) or not " ".join(label.split()):
        raise ValueError(f"a label must be a non-empty string, got {label!r}")
    text = " ".join(label.split())
    if "," in text or ";" in text:
        raise ValueError(f"label {text[:40]!r} contains ',' or ';', which separate classes and synonyms in a class "
                         "list; use another word (e.g. 'cup or mug' -> 'cup', then teach 'mug' separately)")
    return _check_name(text, "label")

#: The grammar in one sentence, used verbatim in the CLI help of --classes / --classes-file and
#: in the docs.
CLASS_LIST_GRAMMAR = ("one class per comma in a string, one per line in a file; ';' separates the synonyms of "
                      "a class (in a file ',' too); the first name is shown, synonym scores are merged by max")


def _names(text: str, seps: str, where: str = "class list") -> list[str]:
    for s in seps[1:]:
        text = text.replace(s, seps[0])
    parts = [" ".join(x.split()) for x in text.split(seps[0])]
    names = [n for n in parts if n]
    if names and len(names) < len(parts):
        _warn_empty(f"{where}: empty synonym ignored in {text.strip()!r}")
    return list(dict.fromkeys(_check_name(n, where) for n in names))


def _warn_empty(msg: str) -> None:
    warnings.warn(msg, UserWarning, stacklevel=4)


def _check_unique(classes: list[list[str]], where: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, syns in enumerate(classes):
        key = syns[0].lower()
        if key in seen:
            raise ValueError(f"class {syns[0]!r} appears twice ({where[seen[key]]} and {where[i]})")
        seen[key] = i


def parse_class_lines(lines: Sequence[str], *, indexed: bool = False) -> list[list[str]]:
    """Classes of a one-class-per-line list (a class file): synonyms after ``;`` or ``,``.

    Args:
        lines: text lines; ``#`` comments and blank lines are skipped.
        indexed: the file names mask values by line (line 1 = value 0; masks, YOLO labels):
            a blank or ``#`` line before the last class line is an error instead.

    Returns:
        One synonym list per class, the display name first.

    Raises:
        ValueError: no class at all, a line with separators but no name, or two classes with
            the same display name (case-insensitive); the message names the lines.
    """
    out: list[list[str]] = []
    where: list[str] = []
    last = max([i for i, ln in enumerate(lines, 1) if ln.strip() and not ln.strip().startswith("#")], default=0)
    for num, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            if indexed and num < last:
                raise ValueError(f"line {num} is {'blank' if not line else 'a comment'}; in a class file for masks "
                                 f"or YOLO labels line k names value k - 1, so it would shift every later name: "
                                 f"write the class of value {num - 1} there (e.g. 'unused')")
            continue
        names = _names(line, ";,", f"line {num}")
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
    out, where = [], []
    for pos, item in enumerate(items):
        names = _names(item, ";", f"class #{pos + 1}")
        if not names:
            _warn_empty(f"class #{pos + 1} is empty in {text!r} (a stray comma); ignored")
            continue
        out.append(names)
        where.append(f"entries #{pos + 1}")
    _check_unique(out, where)
    return out


def read_class_file(path: str | Path, *, indexed: bool = False) -> list[list[str]]:
    """Read a class file (one class per line, module grammar); see `parse_class_lines`
    (``indexed``: a class file for masks or YOLO labels, where line k names value k - 1).

    Raises:
        FileNotFoundError: no such file. ValueError: not UTF-8 text, or malformed; the message
            names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path}")
    try:
        return parse_class_lines(path.read_text(encoding="utf-8").splitlines(), indexed=indexed)
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
        ValueError: the list is empty, an item is not a string, a name holds a control
            character or is longer than `MAX_LABEL_CHARS`, or a class appears twice
            (case-insensitive); the message names the offending entry. An empty entry (a
            trailing comma, an empty synonym) is ignored with a ``UserWarning``.
    """
    if isinstance(classes, str):
        out = parse_class_text(classes)
        return [c[0] for c in out], out
    items = list(classes)
    if not items:
        raise ValueError("the class list is empty; give at least one class name, e.g. 'cat,dog'")
    out = []
    where = []
    for pos, item in enumerate(items):
        if isinstance(item, str):
            names = _names(item, ";", f"class #{pos + 1}")
        elif isinstance(item, (list, tuple)) and all(isinstance(n, str) for n in item):
            names = list(dict.fromkeys(_check_name(" ".join(n.split()), f"class #{pos + 1}") for n in item if n.strip()))
        else:
            raise ValueError(f"classes must be strings, got {items!r}")
        if not names:
            if all(isinstance(i, str) and not i.strip() for i in items):
                raise ValueError("the class list is empty; give at least one class name, e.g. 'cat,dog'")
            _warn_empty(f"class #{pos + 1} is empty in {items!r}; ignored")
            continue
        out.append(names)
        where.append(f"entries #{pos + 1}")
    _check_unique(out, where)
    return [c[0] for c in out], out
