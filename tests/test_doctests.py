"""The doctests of the retrieval modules (issue 21) run under pytest: each example is an
executable check on tiny arrays, and a wrong output fails here."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["reme.inference.kernel", "reme.inference.retrieval", "reme.inference.maps", "reme.io"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no doctest"
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctests of {name} failed"
