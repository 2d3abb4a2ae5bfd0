"""CLI defaults come from the library constants (issue 21), and output to a closed pipe ends
quietly (issue 22)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

from typer.testing import CliRunner

from conftest import REPO
from reme import defaults
from reme.cli import app


def test_cli_defaults_are_the_library_constants():
    from reme.build._shard_stages import MAX_BUILD_PIXELS
    from reme.inference import segmenter as sm

    assert defaults.MAX_WORKING_PIXELS == sm.DEFAULT_MAX_WORKING_PIXELS
    assert defaults.LOGIT_SCALE == sm.DEFAULT_SEGMENT_LOGIT_SCALE == sm.DEFAULT_LABEL_LOGIT_SCALE
    assert defaults.TOP_K == sm.DEFAULT_TOP_K and defaults.MAX_BUILD_PIXELS == MAX_BUILD_PIXELS
    from reme.inference.predictor import DEFAULT_PROPOSAL_PIXELS, Predictor

    assert inspect.signature(Predictor).parameters["proposal_pixels"].default == DEFAULT_PROPOSAL_PIXELS
    assert inspect.signature(sm.Segmenter).parameters["proposal_pixels"].default == DEFAULT_PROPOSAL_PIXELS
    text = " ".join(CliRunner().invoke(app, ["segment", "--help"], terminal_width=400,
                                       env={"COLUMNS": "400"}).output.split())
    assert f"default: {sm.DEFAULT_MAX_WORKING_PIXELS}" in text and f"(default {sm.DEFAULT_TOP_K};" in text


def test_list_into_a_closed_pipe_ends_quietly(tmp_path):
    """`reme add-examples --list | head -1` ended with 'error: [Errno 32] Broken pipe'."""
    from test_overlay_transactions import add_one, tiny_base

    from reme.reference.overlay import Overlay

    ov = Overlay.empty(tiny_base())
    for i in range(3000):
        add_one(ov, "cup", i)
    ov.save(tmp_path / "ov")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(f"'{sys.executable}' -m reme.cli add-examples --overlay '{tmp_path / 'ov'}' --list | head -1",
                          shell=True, capture_output=True, text=True, env=env, timeout=300,
                          executable="/bin/bash")
    assert proc.stdout.count("\n") == 1 and "example_id" in proc.stdout
    assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
