"""--quantization on the CPU: one decode step of a random dense model of --shape loaded as float32 and
under --quantization int8, fp8 and w4a16, in one process, rounds alternating.

On an x86-64 CPU with our quantized kernels int8 and fp8 make every layer Q8_0 blocks, w4a16 the
linears (and experts) 4-bit blocks of 32 with a scale and an offset each and the rest Q8_0; the
quantized models step through the fused decode stack where they take it, float32 layer by layer.
`--widened` adds w4a16 as it loaded before the kernels took it (the W4A16 method, which off CUDA
widens every weight at every step: seconds a step at 1B). Each of --rows requests first prefills
--context tokens; every round times --steps decode steps of each. Prints each round's milliseconds
a step and the medians.

    python benchmarks/cpu_quantization_at_load.py --shape smollm2-135m --rounds 5 --widened
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cpu_decode_step import median_ms_per_step
from cpu_quantized_checkpoints import decode_paths
from model_shapes import write_random_weights

from batchlm.layers.quantization import registry
from batchlm.models.loader import load_model

QUANTIZATIONS = ("int8", "fp8", "w4a16")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--widened", action="store_true", help="also time w4a16 without the CPU kernels")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as work, torch.inference_mode():
        model_dir = write_random_weights(args.shape, Path(work) / "dense")
        dense = load_model(model_dir, torch.float32, cpu, progress=False)
        paths: dict[str, Callable[[], Any]] = {
            "float32": decode_paths(dense, args.context, args.rows, False)["layer by layer"]
        }
        for quantization in QUANTIZATIONS:
            loaded = load_model(model_dir, torch.float32, cpu, progress=False, quantization=quantization)
            steps = decode_paths(loaded, args.context, args.rows, True)
            paths[quantization] = steps.get("fused", steps["layer by layer"])
        if args.widened:
            with mock.patch.object(registry, "_on_cpu_kernels", lambda spec, kinds: None):
                widened = load_model(model_dir, torch.float32, cpu, progress=False, quantization="w4a16")
            paths["w4a16 widened"] = decode_paths(widened, args.context, args.rows, False)["layer by layer"]
        median_ms_per_step(paths, args.rounds, args.steps)


if __name__ == "__main__":
    main()
