"""The Python API prints no Hugging Face "Loading weights" progress bars (issue 22)."""

import subprocess
import sys

from conftest import REPO

_SCRIPT = """
from reme import Segmenter
Segmenter("reference_sets/default").predict("skimage:coffee", "cup, table")
"""


def _stderr() -> str:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_python_api_loads_models_without_progress_bars():
    assert "Loading weights" not in _stderr()
