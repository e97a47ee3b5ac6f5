"""Peak resident memory of each tensor-parallel rank's worker process (VmHWM), and of this driver
process, for one model on the CPU engine: what splitting a model over ranks costs or saves per rank.

    python benchmarks/tp_rank_memory.py --model path/to/model.gguf --tensor-parallel-size 2

Loads the model with `batchlm.LLM`, generates a few greedy tokens (so every rank has run a step),
then prints one JSON line: each rank's peak and current resident MiB, the driver's, and the tokens
(to check that two trees or sizes computed the same). At one rank the model is in this process:
its figure is the driver's peak."""

from __future__ import annotations

import argparse
import json
import os
import resource
from pathlib import Path
from typing import Any


def status_mib(pid: int, field: str) -> float:
    """A VmHWM / VmRSS line of /proc/<pid>/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"{field} not in /proc/{pid}/status")


def worker_pids(llm: Any) -> list[int]:
    """The ranks' worker processes (none at one rank: the model runs in this process)."""
    pids = getattr(llm.engine_core.executor, "worker_pids", [])
    return [pid for pid in pids if pid is not None]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a model directory or GGUF file")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8, help="greedy tokens generated after loading")
    args = parser.parse_args()

    from batchlm import LLM, SamplingParams

    llm = LLM(args.model, device="cpu", tensor_parallel_size=args.tensor_parallel_size)
    output = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=args.tokens, temperature=0))[0]
    ranks = [
        {
            "pid": pid,
            "peak_mib": round(status_mib(pid, "VmHWM"), 1),
            "rss_mib": round(status_mib(pid, "VmRSS"), 1),
        }
        for pid in worker_pids(llm)
    ]
    driver_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "model": os.path.basename(args.model),
                "tensor_parallel_size": args.tensor_parallel_size,
                "ranks": ranks,
                "driver_peak_mib": round(driver_peak_mib, 1),
                "tokens": list(output.outputs[0].token_ids),
            }
        )
    )


if __name__ == "__main__":
    main()
