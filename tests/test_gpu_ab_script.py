"""benchmarks/gpu_ab.sh with the benchmarks replaced by a stand-in `python3` that prints fixed runs per
tree: the trees alternate, the order swaps every round, and the medians and ratio are those of the runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Prints three runs whose figures depend on the tree (PYTHONPATH); runs the real Python for `python3 -`.
STAND_IN = """#!/bin/bash
if [ "$1" = "-" ]; then exec {python} "$@"; fi
echo "$PYTHONPATH $*" >> "$CALLS"
base=$([ "${{PYTHONPATH%%:*}}" = new-tree ] && echo 2 || echo 1)
for run in 0 1 2; do
  echo "{{\\"engine\\": \\"batchlm\\", \\"run\\": $run, \\"output_tok_s\\": $((100 * base + run)), \\"itl_ms_median\\": $base.$run}}"
done
echo '{{"shape": "summary", "batchlm median output tok/s": 1}}'
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_trees_alternate_and_the_ratio_is_of_their_medians(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "python3"
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "OUT": str(tmp_path / "out"),
        "CALLS": str(calls),
    }
    env["ROUNDS"] = "3"
    env["PYTHONPATH"] = "carried-wheels"
    result = subprocess.run(
        ["bash", "benchmarks/gpu_ab.sh", "old-tree", "new-tree", "single1b", "w1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "[single1b round 1 old] 1.0 1.1 1.2",
        "[single1b round 1 new] 2.0 2.1 2.2",
        "[single1b round 2 new] 2.0 2.1 2.2",
    ]
    assert "[single1b] median of 9 / 9 runs: old 1.1, new 2.1 ms ITL; new / old 1.9091" in lines
    assert "[w1] median of 9 / 9 runs: old 101, new 201 output tok/s; new / old 1.9901" in lines
    paths = [line.split()[0] for line in calls.read_text().splitlines()]
    order = ["old-tree", "new-tree", "new-tree", "old-tree", "old-tree", "new-tree"] * 2
    assert paths == [f"{tree}:carried-wheels" for tree in order]
    assert all("--num-requests 256" in line for line in calls.read_text().splitlines()[6:])
