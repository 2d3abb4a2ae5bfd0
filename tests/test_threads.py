"""Thread policy of the entry points (reme.cli.threads)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reme.cli import threads


def test_auto_policy_leaves_loaded_cores_alone():
    assert threads.auto_threads(cores=2, load1=0.3) == 2
    assert threads.auto_threads(cores=2, load1=1.2) == 2  # one unit of load is tolerated
    assert threads.auto_threads(cores=2, load1=2.1) == 1
    assert threads.auto_threads(cores=2, load1=12.0) == 1
    assert threads.auto_threads(cores=16, load1=3.5) == 14


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv(threads.ENV_VAR, "3")
    assert threads.choose_threads() == 3
    assert threads.choose_threads(5) == 5
    monkeypatch.setenv(threads.ENV_VAR, "auto")
    assert 1 <= threads.choose_threads() <= threads.available_cores()


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_bad_values_name_their_source(monkeypatch, bad):
    monkeypatch.setenv(threads.ENV_VAR, bad)
    with pytest.raises(ValueError, match=r"\$REME_THREADS"):
        threads.choose_threads()
    with pytest.raises(ValueError, match="^threads"):
        threads.choose_threads(bad)


def test_apply_before_torch_sets_the_environment_torch_reads():
    code = ("import reme.cli.threads as t, sys; n = t.apply_threads(1); assert 'torch' not in sys.modules; "
            "import torch; print(n, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"]


def test_library_import_leaves_the_thread_count_alone():
    import torch

    before = torch.get_num_threads()
    import reme.inference.segmenter  # noqa: F401
    import reme.encoders.text  # noqa: F401

    assert torch.get_num_threads() == before


def test_cli_refuses_a_bad_reme_threads_in_one_line():
    from typer.testing import CliRunner

    from reme.cli import app

    res = CliRunner().invoke(app, ["segment", "missing.jpg", "--classes", "cat"], env={"REME_THREADS": "lots"})
    assert res.exit_code == 2
    assert "REME_THREADS must be a positive integer or 'auto'" in res.output


def test_build_workers_auto_follows_the_thread_policy(monkeypatch):
    monkeypatch.setenv(threads.ENV_VAR, "3")
    assert threads.build_workers("cpu") == 3
    assert threads.build_workers("cuda:0") == 1 and threads.build_workers("cpu", engine="ray") == 1
    monkeypatch.setenv(threads.ENV_VAR, "1")
    assert threads.build_workers("cpu") == 1
