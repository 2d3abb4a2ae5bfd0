"""Parsing of user class lists ("cat, dog; puppy, striped rug")."""

from __future__ import annotations

from typing import Sequence


def parse_classes(classes: str | Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Validate a class list and split synonyms.

    A class is a free-form string ("a small brown dog"). Within one class, ``;`` separates
    synonyms ("person; people; man") whose scores are merged by max at inference.

    Args:
        classes: a comma-separated string or a sequence of strings.

    Returns:
        ``(names, synonyms)``: the display name of each class (its first synonym) and,
        per class, the list of its synonym strings.

    Raises:
        ValueError: the list is empty, a class is empty, or a class appears twice
            (case-insensitive); the message names the offending entry.
    """
    if isinstance(classes, str):
        items = classes.split(",")
    else:
        items = list(classes)
        if any(not isinstance(c, str) for c in items):
            raise ValueError(f"classes must be strings, got {items!r}")
    if not items or all(not c.strip() for c in items):
        raise ValueError("the class list is empty; give at least one class name, e.g. 'cat,dog'")
    names, synonyms, seen = [], [], {}
    for pos, item in enumerate(items):
        syns = [" ".join(s.split()) for s in item.split(";") if s.strip()]
        if not syns:
            raise ValueError(f"class #{pos + 1} is empty in {items!r}")
        key = syns[0].lower()
        if key in seen:
            raise ValueError(f"class {syns[0]!r} appears twice (entries #{seen[key] + 1} and #{pos + 1})")
        seen[key] = pos
        names.append(syns[0])
        synonyms.append(syns)
    return names, synonyms
