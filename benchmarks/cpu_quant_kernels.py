"""Quantized-weight matmuls on this CPU, on one model shape's real sizes with random weights: every
linear of all layers (distinct weights, streamed as a forward pass streams them), then the LM head,
at decode and prefill row counts.

- f32 packed: our float32 panel GEMM (cpu_gemm.py), the dense baseline.
- w8 / w4 (ours): cpu_quant.py, 8-bit (Q8_0) and 4-bit (Q4_1) codes, on the CPU's best path:
  AMX tiles for 8 rows or more where present, else AVX-512 VNNI where present, else AVX2 (--isa
  avx512 or avx2 forces one). Q8_0's biases follow from its scales, so its panels store none; "w8
  ours, biases stored" packs the same blocks with them, as other 8-bit weights are. "w4 ours, Q4_0"
  is 4-bit codes of a symmetric format (no biases stored).
- torch int8pack: aten._weight_int8pack_mm (int8 weight, one scale per output row: cannot hold Q8_0's
  per-32 scales, so only an upper bound for what torch offers).
- torch int4pack: aten._weight_int4pack_mm_for_cpu (4-bit, per-32 group scales and zeros in bfloat16,
  bfloat16 activations).

    python benchmarks/cpu_quant_kernels.py --shape smollm2-135m --rows 1 16 128

Prints one JSON line per measurement (median of --repeats timings, milliseconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from model_shapes import SHAPES

from batchlm.kernels import cpu_quant, quant_panels
from batchlm.kernels.cpu_gemm import pack_weight, packed_linear
from batchlm.kernels.dense_blocks import from_dense_q8
from batchlm.kernels.quant_blocks import CodeBlocks

Matmul = Callable[[torch.Tensor], object]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def layer_shapes(config: dict) -> list[tuple[int, int]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim", hidden // config["num_attention_heads"])
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    return [
        (qkv, hidden),
        (hidden, config["num_attention_heads"] * head_dim),
        (2 * inter, hidden),
        (hidden, inter),
    ]


def random_w4(weight: torch.Tensor) -> CodeBlocks:
    """4-bit codes with per-32 scale and bias spanning each block's range (as Q4_1 would)."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // 32, 32).numpy()
    low, high = blocks.min(-1), blocks.max(-1)
    scales = ((high - low) / 15).astype(np.float16)
    wide = np.maximum(scales.astype(np.float32), 1e-8)[..., None]
    codes = np.clip(np.rint((blocks - low[..., None]) / wide), 0, 15).astype(np.uint8)
    return CodeBlocks(codes.reshape(rows, cols), scales, low.astype(np.float16), 4)


def random_q4_0(weight: torch.Tensor) -> CodeBlocks:
    """Q4_0 as llama.cpp makes it: per block d = the value of largest magnitude / -8, codes round(w / d)
    + 8 clipped to 15, bias -8 d."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // 32, 32).numpy()
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    scales = (extreme / -8).astype(np.float16)
    wide = scales.astype(np.float32)[..., None]
    safe = np.where(wide == 0, 1, wide)
    codes = np.clip(np.rint(blocks / safe) + 8, 0, 15).astype(np.uint8)
    return CodeBlocks(
        codes.reshape(rows, cols), scales, (scales.astype(np.float32) * -8).astype(np.float16), 4
    )


def torch_int8(weight: torch.Tensor) -> Matmul:
    scales = weight.abs().amax(dim=1) / 127
    codes = torch.round(weight / scales[:, None]).to(torch.int8)
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, codes, scales)


def torch_int4(weight: torch.Tensor) -> Matmul | None:
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // 32, 32)
    low, high = blocks.amin(-1), blocks.amax(-1)
    scales = ((high - low) / 15).clamp_min(1e-8)
    codes = torch.clamp(torch.round((blocks - low[..., None]) / scales[..., None]), 0, 15).to(torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.reshape(rows, cols), 1)
    except RuntimeError:
        return None
    # torch's zero point is the value of code 8: w = (q - 8) * scale + zero.
    zeros = low + 8 * scales
    scale_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, 32, scale_zeros)


def methods(weight: torch.Tensor) -> dict[str, Matmul | None]:
    f32 = pack_weight(weight)
    q8 = from_dense_q8(weight.numpy())
    w8, w8_stored = quant_panels.pack(q8), quant_panels.pack(q8, omit_biases=False)
    w4, w4_q4_0 = quant_panels.pack(random_w4(weight)), quant_panels.pack(random_q4_0(weight))
    return {
        "f32 packed": lambda x: packed_linear(x, f32),
        "w8 ours": lambda x: cpu_quant.quant_linear(x, w8),
        "w8 ours, biases stored": lambda x: cpu_quant.quant_linear(x, w8_stored),
        "w4 ours": lambda x: cpu_quant.quant_linear(x, w4),
        "w4 ours, Q4_0": lambda x: cpu_quant.quant_linear(x, w4_q4_0),
        "torch int8pack": torch_int8(weight),
        "torch int4pack": torch_int4(weight),
    }


def run(config: dict, rows_list: list[int], repeats: int) -> None:
    shapes = layer_shapes(config)
    layers = [
        [methods(torch.randn(n, k) * 0.02) for n, k in shapes] for _ in range(config["num_hidden_layers"])
    ]
    head = methods(torch.randn(config["vocab_size"], config["hidden_size"]) * 0.02)
    for rows in rows_list:
        inputs = {k: torch.randn(rows, k) for _, k in shapes}
        for name in head:
            if head[name] is None:
                continue

            def all_layers(name: str = name, inputs: dict[int, torch.Tensor] = inputs) -> None:
                for layer in layers:
                    for (_, k), matmuls in zip(shapes, layer, strict=True):
                        matmuls[name](inputs[k])  # type: ignore[misc]

            x = torch.randn(rows, config["hidden_size"])
            for part, fn in (("layers", all_layers), ("lm_head", lambda name=name, x=x: head[name](x))):  # type: ignore[misc]
                print(
                    json.dumps({"op": f"{part} {name}", "rows": rows, "ms": round(median_ms(fn, repeats), 2)})
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--isa", choices=["auto", "avx512", "avx2"], default="auto")
    args = parser.parse_args()
    if args.isa != "auto":
        os.environ[cpu_quant.ISA_ENV] = args.isa
    if cpu_quant.quant_library() is None:
        parser.error("the quantized CPU kernels are not available here")
    print(json.dumps({"shape": args.shape, "threads": torch.get_num_threads(), "avx512_vnni": cpu_quant.use_avx512(), "amx": cpu_quant.use_amx(),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))  # fmt: skip
    run(SHAPES[args.shape], args.rows, args.repeats)


if __name__ == "__main__":
    main()
