"""Command-line interface: ``reme build-reference``, ``reme segment``, ``reme add-examples``,
``reme info``, ``reme inspect``, ``reme demo``, ``reme eval``, ``reme ablate``.

Thin wrappers over the Python API; flags mirror the keyword names.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import typer

from reme.cli._common import app
# Each module registers its commands on `app`; this order is the order of `reme --help`.
from reme.cli import _build  # noqa: F401,E402  isort: skip
from reme.cli import _segment  # noqa: F401  isort: skip
from reme.cli import _examples  # noqa: F401  isort: skip
from reme.cli import _misc  # noqa: F401  isort: skip
from reme.cli import _eval  # noqa: F401  isort: skip

__all__ = ["app", "main"]

# Help shows a metavar per value type (TEXT, INTEGER, FLOAT, PATH / DIR / FILE) instead of the
# Python type typer would print (<list[Path]>, <str>).
_PATH_METAVARS = {"images": "DIR", "out": "DIR", "reference": "DIR", "masks": "DIR", "image_root": "DIR",
                  "work_dir": "DIR", "root": "DIR", "photos": "DIR", "annotations": "FILE", "classes_file": "FILE",
                  "captions": "FILE", "overlay": "DIR", "overlay_dir": "DIR", "yolo_labels": "DIR"}
_TYPE_METAVARS = {str: "TEXT", int: "INTEGER", float: "FLOAT"}


def _set_metavars(typer_app: typer.Typer) -> None:
    import typing

    infos = (typer.models.OptionInfo, typer.models.ArgumentInfo)
    for command in typer_app.registered_commands:
        hints = typing.get_type_hints(command.callback, include_extras=True)
        for name, param in inspect.signature(command.callback).parameters.items():
            info, hint = param.default, hints[name]
            if typing.get_origin(hint) is typing.Annotated:   # `name: Annotated[type, typer.Option(...)] = default`
                info = next((m for m in hint.__metadata__ if isinstance(m, infos)), info)
                hint = hint.__origin__
            if not isinstance(info, infos) or info.metavar:
                continue
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            base = args[0] if typing.get_origin(hint) in (typing.Union, list) and args else hint
            if base is Path:
                info.metavar = _PATH_METAVARS.get(name, "PATH")
            elif base in _TYPE_METAVARS:
                info.metavar = _TYPE_METAVARS[base]
            if isinstance(info, typer.models.ArgumentInfo) and info.metavar:
                info.metavar = name.upper()


def _argument_type(self, ctx):
    """Arguments with a metavar show just it in help (typer would add ``<list[str]>``)."""
    return None if self.metavar else _typer_argument_type(self, ctx)


_typer_argument_type = typer.core.TyperArgument.display_type_rich
typer.core.TyperArgument.display_type_rich = _argument_type
_set_metavars(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
