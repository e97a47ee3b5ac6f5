"""OpenMP wait policy and thread count A/B for single-stream CPU decode, with and without a busy
neighbour (a shell busy loop): each variant runs benchmarks/offline_throughput.py (one request, a random
model of SmolLM2-135M's shape) in a fresh process under its environment, variants alternating within
each round. Prints every run's median inter-token latency, then per variant and condition the median
and range over rounds.

    python benchmarks/cpu_wait_policy.py --rounds 3 --output-len 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Variant name -> environment it adds to the caller's, less the knobs measured here. GOMP_SPINCOUNT
# at libgomp's own default keeps batchlm from choosing a policy (it sets PASSIVE only where the user
# set neither variable).
VARIANTS: dict[str, dict[str, str]] = {
    "libgomp default": {"GOMP_SPINCOUNT": "300000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "spin 10k": {"GOMP_SPINCOUNT": "10000"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def one_run(variant: str, args: argparse.Namespace) -> float | None:
    """The run's median inter-token latency in ms, or None when it failed or timed out."""
    env = {k: v for k, v in os.environ.items() if k not in KNOBS} | VARIANTS[variant]
    command = [
        sys.executable,
        str(HERE / "offline_throughput.py"),
        "--num-requests=1",
        "--input-len=16",
        f"--output-len={args.output_len}",
        "--runs=1",
        "--device=cpu",
        f"--model-dir={args.model_dir}",
    ]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return None
    for line in done.stdout.splitlines():
        if line.startswith("{") and '"run"' in line:
            return float(json.loads(line)["itl_ms_median"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/batchlm-wait-policy-model"))
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument("--no-neighbour", action="store_true", help="only the runs without a busy loop")
    args = parser.parse_args()
    variants = args.variants.split(",")
    conditions = ("as found",) if args.no_neighbour else ("as found", "+ busy loop")
    results: dict[tuple[str, str], list[float]] = {}
    for round_index in range(args.rounds):
        for condition in conditions:
            neighbour = (
                subprocess.Popen(["sh", "-c", "while :; do :; done"]) if condition != "as found" else None
            )
            try:
                for variant in variants:
                    itl = one_run(variant, args)
                    print(
                        json.dumps(
                            {"round": round_index, "condition": condition, "variant": variant, "itl_ms": itl}
                        ),
                        flush=True,
                    )
                    if itl is not None:
                        results.setdefault((variant, condition), []).append(itl)
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
    for (variant, condition), values in sorted(results.items()):
        print(
            f"{condition:<12} {variant:<10} median ITL {statistics.median(values):8.1f} ms "
            f"(range {min(values):.1f}-{max(values):.1f}, {len(values)} runs)"
        )


if __name__ == "__main__":
    main()
