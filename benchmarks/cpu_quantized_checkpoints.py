"""A 4-bit (GPTQ layout, with act order or without), 8-bit GPTQ, FP8 (compressed-tensors) or
block-wise FP8 (transformers' fine-grained) safetensors checkpoint on the CPU: one decode step of a
random model of --shape through our quantized CPU kernels (what such checkpoints take on x86-64 CPUs)
against the layers as they load without them (the W4A16 / FP8 methods, which off CUDA widen every
weight at every step; block-wise FP8 and 8-bit GPTQ dense float32), in one process, rounds
alternating.

The checkpoint is the dense random model's linears rounded to 4-bit or 8-bit groups (symmetric; of
128 inputs, or 64 or 32 where a row is no whole number of 128; act order: each layer's inputs visited
in a shuffled order) or per-row FP8 or FP8 in 128 x 128 blocks, packed the way GPTQ,
compressed-tensors and transformers store them (tests/quant_checkpoints.py). Each
of --rows requests first prefills --context tokens; every round then times --steps decode steps of
each path, layer by layer (the model's forward and the LM head), and for the kernels also through the
fused decode stack where the model takes it. Prints each round's milliseconds a step and the medians.

    python benchmarks/cpu_quantized_checkpoints.py --shape smollm2-135m --format gptq --rounds 5
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

from cpu_decode_step import BLOCK_SIZE, median_ms_per_step, step_inputs
from model_shapes import SHAPES, write_random_weights

from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.layers.quantization import registry
from batchlm.layers.quantization.forms import Int8Weight
from batchlm.layers.quantization.int4 import default_group_size, quantize_int4_groups
from batchlm.models.loader import LoadedModel, load_model
from batchlm.runner.fused_decode import build_fused_decode
from quant_checkpoints import (
    act_ordered,
    block_fp8_config,
    block_fp8_tensors,
    compressed_config,
    fp8_tensors,
    gptq8_tensors,
    gptq_act_order_tensors,
    gptq_tensors,
    rewrite_checkpoint,
)

FP8_BLOCK = (128, 128)


def write_checkpoint(shape: str, fmt: str, work: Path) -> Path:
    dense = write_random_weights(shape, work / "dense")
    params = SHAPES[shape]
    # One group size for the whole checkpoint, as GPTQ's config has it.
    widths = [
        params[key] for key in ("hidden_size", "intermediate_size", "moe_intermediate_size") if key in params
    ]
    group = min(default_group_size(width) for width in widths)

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], None]:
        if fmt == "gptq":
            return gptq_tensors(quantize_int4_groups(weight.float(), group)), None
        if fmt == "gptq-8bit":
            return gptq8_tensors(int8_groups(weight.float(), group)), None
        if fmt == "gptq-act-order":
            return gptq_act_order_tensors(
                act_ordered(quantize_int4_groups(weight.float(), group), module)
            ), None
        if fmt == "fp8":
            return fp8_tensors(weight, False, None), None
        return block_fp8_tensors(weight, FP8_BLOCK)[0], None

    if fmt.startswith("gptq"):
        config: dict[str, Any] = {
            "quant_method": "gptq", "bits": 8 if fmt == "gptq-8bit" else 4, "group_size": group,
            "desc_act": fmt == "gptq-act-order", "sym": True
        }  # fmt: skip
    elif fmt == "fp8-block":
        config = block_fp8_config(FP8_BLOCK)
    else:
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
        inputs = {"num_bits": 8, "type": "float", "dynamic": True, "strategy": "token"}
        config = compressed_config(weights, inputs, "float-quantized")
    rewrite_checkpoint(dense, work / fmt, config, convert)
    return work / fmt


def int8_groups(weight: torch.Tensor, group: int) -> Int8Weight:
    """Symmetric 8-bit round-to-nearest per group (zero point 128), as GPTQ's 8-bit checkpoints hold."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // group, group)
    scales = (groups.abs().amax(dim=2) / 127).clamp(min=1e-8)
    codes = (groups / scales[:, :, None]).round().clamp(-128, 127) + 128
    zeros = torch.full(scales.shape, 128, dtype=torch.int16)
    return Int8Weight(codes.to(torch.uint8).reshape(rows, cols), scales.to(torch.float16), zeros, group)


def decode_paths(loaded: LoadedModel, context: int, rows: int, fused: bool) -> dict[str, Callable[[], Any]]:
    model, shape = loaded.model, loaded.shape
    blocks_each = -(-(context + 1) // BLOCK_SIZE)
    caches = [
        torch.zeros(2, rows * blocks_each, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim)
        for _ in range(shape.num_layers)
    ]
    backend = TorchAttentionBackend()
    prefill = step_inputs([context] * rows, [0] * rows, blocks_each)
    model(prefill.input_ids, prefill.positions, caches, prefill.meta, backend)
    decode = step_inputs([1] * rows, [context] * rows, blocks_each)

    def layer_by_layer() -> torch.Tensor:
        return model.compute_logits(model(decode.input_ids, decode.positions, caches, decode.meta, backend))

    paths: dict[str, Callable[[], Any]] = {"layer by layer": layer_by_layer}
    stack = build_fused_decode(model, caches, backend) if fused else None
    if stack is not None:
        paths["fused"] = lambda: stack.run(decode)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument(
        "--format", choices=["gptq", "gptq-act-order", "gptq-8bit", "fp8", "fp8-block"], default="gptq"
    )
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also time the kernels with --quantization int8 (dense layers Q8_0)",
    )
    parser.add_argument("--no-widened", action="store_true", help="skip the path without the kernels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, torch.inference_mode():
        model_dir = write_checkpoint(args.shape, args.format, Path(work))
        cpu = torch.device("cpu")
        kernels = load_model(model_dir, torch.float32, cpu, progress=False)
        paths = {
            f"kernels, {name}": path
            for name, path in decode_paths(kernels, args.context, args.rows, True).items()
        }
        if args.int8:
            int8 = load_model(model_dir, torch.float32, cpu, progress=False, quantization="int8")
            paths["kernels and int8, fused"] = decode_paths(int8, args.context, args.rows, True)["fused"]
        if not args.no_widened:
            with mock.patch.object(registry, "_on_cpu_kernels", lambda spec, kinds: None):
                widened = load_model(model_dir, torch.float32, cpu, progress=False)
            paths["without the kernels, layer by layer"] = decode_paths(
                widened, args.context, args.rows, False
            )["layer by layer"]
        median_ms_per_step(paths, args.rounds, args.steps)


if __name__ == "__main__":
    main()
