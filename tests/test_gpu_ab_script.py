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


def run_gpu_ab(
    tmp_path: Path, stand_in_script: str, rounds: int, *workloads: str
) -> tuple[list[str], list[str]]:
    """gpu_ab.sh over two stand-in trees with `stand_in_script` as `python3`: its output lines and the
    stand-in's calls (one line each, as the script logs them to $CALLS)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "python3"
    stand_in.write_text(stand_in_script.format(python=sys.executable))
    stand_in.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    env.update(CALLS=str(calls), ROUNDS=str(rounds), PYTHONPATH="carried-wheels")
    result = subprocess.run(
        ["bash", "benchmarks/gpu_ab.sh", "old-tree", "new-tree", *workloads],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.splitlines(), calls.read_text().splitlines()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_trees_alternate_and_the_ratio_is_of_their_medians(tmp_path: Path) -> None:
    lines, calls = run_gpu_ab(tmp_path, STAND_IN, 3, "single1b", "w1")
    assert lines[:3] == [
        "[single1b round 1 old] 1.0 1.1 1.2",
        "[single1b round 1 new] 2.0 2.1 2.2",
        "[single1b round 2 new] 2.0 2.1 2.2",
    ]
    assert "[single1b] median of 9 / 9 runs: old 1.1, new 2.1 ms ITL; new / old 1.9091" in lines
    assert "[w1] median of 9 / 9 runs: old 101, new 201 output tok/s; new / old 1.9901" in lines
    paths = [line.split()[0] for line in calls]
    order = ["old-tree", "new-tree", "new-tree", "old-tree", "old-tree", "new-tree"] * 2
    assert paths == [f"{tree}:carried-wheels" for tree in order]
    assert all("--num-requests 256" in line for line in calls[6:])


# The structured W1 summary: each structured run over the plain run before it, by tree.
STRUCTURED_STAND_IN = """#!/bin/bash
if [ "$1" = "-" ]; then exec {python} "$@"; fi
echo "$*" >> "$CALLS"
pairs=$([ "${{PYTHONPATH%%:*}}" = new-tree ] && echo "0.85, 0.9, 0.8" || echo "0.7, 0.75, 0.65")
echo "{{\\"engine\\": \\"batchlm-structured-first-pass\\", \\"run\\": -1, \\"output_tok_s\\": 5.0}}"
echo "{{\\"shape\\": \\"summary\\", \\"structured_over_plain\\": 0.1, \\"structured_over_plain_pairs\\": [$pairs]}}"
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_structured_workloads_compare_the_trees_by_their_structured_over_plain_pairs(tmp_path: Path) -> None:
    lines, commands = run_gpu_ab(tmp_path, STRUCTURED_STAND_IN, 1, "w1_structured", "w1_structured_free")
    assert "[w1_structured round 1 old] 0.7 0.75 0.65" in lines
    assert "[w1_structured round 1 new] 0.85 0.9 0.8" in lines
    for workload in ("w1_structured", "w1_structured_free"):
        assert (
            f"[{workload}] median of 3 / 3 runs: old 0.7, new 0.85 structured / plain; new / old 1.2143"
            in lines
        )
    assert len(commands) == 4 and all("--structured" in command for command in commands)
    assert ["--summary-field free" in command for command in commands] == [False, False, True, True]
