"""Micro-benchmark of the quantized linears at Llama-3.1-8B shapes: bf16 torch matmul, FP8 W8A8
(our per-token quantizer + cuBLASLt's scaled matmul) and W4A16 (our Triton kernel), at decode row
counts (memory-bound: GB/s of weight bytes against the copy bandwidth measured in the same run) and
prefill row counts (TFLOP/s).

    PYTHONPATH=src python benchmarks/quant_kernels.py [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable

import torch
from triton.testing import do_bench

from batchlm.kernels.fp8_linear import fp8_linear
from batchlm.kernels.int4_pack import pack_int4
from batchlm.kernels.w4a16_gemm import w4a16_matmul
from batchlm.layers.quantization.forms import quantize_fp8_rows
from batchlm.layers.quantization.int4 import quantize_int4_groups

# (name, out_features, in_features) of one Llama-3.1-8B layer's fused linears.
LAYERS = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
ROWS = [1, 16, 64, 512, 4096]


def median_ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_ms(lambda: dst.copy_(src)) / 1e6


def bench_layer(name: str, n: int, k: int, peak: float) -> list[dict[str, object]]:
    dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    fp8 = quantize_fp8_rows(dense)
    fp8_scale = fp8.scale[None, :].contiguous()
    q = quantize_int4_groups(dense, 128)
    packed = pack_int4(q.codes, q.scales, q.zeros, 128)
    weight_bytes = {"bf16": n * k * 2, "fp8": n * k, "w4a16": n * k // 2 + 2 * (n * k // 128) * 2}
    kernels: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "bf16": lambda x: x @ dense.t(),
        "fp8": lambda x: fp8_linear(x, fp8.data, fp8_scale, None, None),
        "w4a16": lambda x: w4a16_matmul(x, packed),
    }
    rows = []
    for m in ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        row: dict[str, object] = {"layer": name, "n": n, "k": k, "rows": m}
        for kind, kernel in kernels.items():
            ms = median_ms(functools.partial(kernel, x))
            row[f"{kind}_us"] = round(ms * 1000, 1)
            if m <= 16:
                row[f"{kind}_of_copy_bw"] = round(weight_bytes[kind] / ms / 1e6 / peak, 2)
            else:
                row[f"{kind}_tflops"] = round(2 * m * n * k / ms / 1e9, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    peak = copy_bandwidth_gbs()
    print(json.dumps({"copy_bandwidth_gbs": round(peak)}))
    rows = [row for name, n, k in LAYERS for row in bench_layer(name, n, k, peak)]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"copy_bandwidth_gbs": peak, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
