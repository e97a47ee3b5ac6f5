"""Kernel checks run under Triton's CPU interpreter, each in a fresh Python: TRITON_INTERPRET is read
when triton is imported, so a test process that already imported it cannot switch it on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run_interpreted(script: str, done_line: str, timeout: float = 600) -> None:
    """Run `script` under the interpreter (src and tests importable); it must exit 0 having printed
    `done_line`. Skips where Triton is not installed. `timeout` only bounds a hang."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done_line in done.stdout
