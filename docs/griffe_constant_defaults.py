"""Griffe extension for the API page: show a parameter's default value, not the constant's name.

``def f(top_k=DEFAULT_TOP_K)`` is rendered as ``f(top_k=10)`` when ``DEFAULT_TOP_K`` is a
module-level constant of the package with a short literal value (the name is kept for long
values and for anything that is not a plain assignment).
"""

from __future__ import annotations

import griffe

MAX_CHARS = 60


class ConstantDefaults(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        self._walk(pkg, pkg)

    def _walk(self, obj, pkg) -> None:
        for member in list(obj.members.values()):
            if member.is_alias:
                continue
            if member.is_function:
                self._fix(member, pkg)
            elif member.is_class or member.is_module:
                self._walk(member, pkg)

    def _fix(self, func: griffe.Function, pkg: griffe.Module) -> None:
        for param in func.parameters:
            default = param.default
            if not isinstance(default, griffe.ExprName):
                continue
            try:
                path = default.canonical_path
                target = pkg.modules_collection.get_member(path) if path.startswith(pkg.name + ".") else None
                if target is not None and target.is_alias:
                    target = target.final_target
            except Exception:  # unresolvable name: keep it
                continue
            if target is None or not target.is_attribute or target.value is None:
                continue
            value = str(target.value)
            if len(value) <= MAX_CHARS and not any(c.isalpha() and c.isupper() for c in value.split("(")[0]):
                param.default = value
