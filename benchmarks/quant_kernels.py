"""Micro-benchmark of the quantized linears at Llama-3.1-8B shapes (and its LM head's), one launch at a
time with the L2 cache flushed before each (triton's do_bench), medians.

Decode rows (1, 4, 16; memory-bound: GB/s of weight bytes against the copy bandwidth measured in the
same run): bf16 torch matmul; FP8 through the decode kernel that reads 16-bit activations
(kernels/fp8_gemv.py, the fastest of its start-up candidates) and through the previous path (our
per-token quantizer + cuBLASLt's scaled matmul); W4A16 through the decode plans (kernels/w4a16_gemv.py
for one row, the GEMM kernel with decode tiles for more; the fastest candidate) and through the GEMM
kernel as it chose before. Prefill rows (64, 512, 4096; TFLOP/s): bf16, FP8 scaled matmul, W4A16 GEMM.
Last, the linears of one 8B decode step at one row (32 layers + the bf16 LM head) summed per kind.

    PYTHONPATH=src python benchmarks/quant_kernels.py [--json out.json] [--no-prefill]
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable, Sequence

import torch
from triton.testing import do_bench

from batchlm.kernels.decode_plans import GemvConfig
from batchlm.kernels.fp8_gemv import candidate_configs, fp8_small_m
from batchlm.kernels.fp8_linear import fp8_linear
from batchlm.kernels.int4_pack import PackedInt4, pack_int4
from batchlm.kernels.w4a16_gemm import W4A16Config, w4a16_matmul
from batchlm.kernels.w4a16_gemv import candidate_plans
from batchlm.layers.quantization.forms import quantize_fp8_rows
from batchlm.layers.quantization.int4 import decode_linear, quantize_int4_groups

DEVICE = "cuda"
GROUP = 128
LAYERS_8B = 32
# (name, out_features N, in_features K): one Llama-3.1-8B layer's fused linears and the LM head.
SHAPES = [
    ("qkv", 6144, 4096),
    ("o", 4096, 4096),
    ("gate_up", 28672, 4096),
    ("down", 4096, 14336),
    ("lm_head", 128256, 4096),
]
DECODE_ROWS = [1, 4, 16]  # 1 first: the step estimate takes its times
PREFILL_ROWS = [64, 512, 4096]


def median_us(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=10, rep=40, return_mode="median")) * 1000.0


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_us(lambda: dst.copy_(src)) / 1e3


def fastest(launches: Sequence[tuple[str, Callable[[], object]]]) -> tuple[float, str]:
    """(microseconds, name) of the fastest launch."""
    return min((median_us(launch), name) for name, launch in launches)


class Weights:
    """One shape's weight in the three forms."""

    def __init__(self, n: int, k: int) -> None:
        self.dense = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
        fp8 = quantize_fp8_rows(self.dense)
        self.fp8, self.fp8_scale = fp8.data, fp8.scale[None, :].contiguous()
        q = quantize_int4_groups(self.dense, GROUP)
        self.packed: PackedInt4 = pack_int4(q.codes, q.scales, q.zeros, GROUP)
        self.bytes = {"bf16": n * k * 2, "fp8": n * k + 4 * n, "w4a16": n * k // 2 + 2 * 2 * (n * k // GROUP)}


def new_w4a16_plans(one_row: bool) -> list[GemvConfig | W4A16Config]:
    """The decode candidates but the GEMM kernel's previous choice (measured as `w4a16_old`)."""
    return candidate_plans(one_row, GROUP)[:-1]


def decode_row(name: str, w: Weights, m: int, peak_gbs: float) -> tuple[dict[str, object], dict[str, float]]:
    """(the printed row, microseconds per kind)."""
    x = torch.randn(m, w.dense.shape[1], device=DEVICE, dtype=torch.bfloat16)
    one_row = m == 1
    fp8_new = fastest(
        [
            (repr(c), functools.partial(fp8_small_m, x, w.fp8, w.fp8_scale, None, c))
            for c in candidate_configs(one_row)
        ]
    )
    w4_new = fastest(
        [(repr(p), functools.partial(decode_linear, w.packed, x, None, p)) for p in new_w4a16_plans(one_row)]
    )
    times = {
        "bf16": median_us(lambda: x @ w.dense.t()),
        "fp8_new": fp8_new[0],
        "fp8_old": median_us(lambda: fp8_linear(x, w.fp8, w.fp8_scale, None, None)),
        "w4a16_new": w4_new[0],
        "w4a16_old": median_us(lambda: w4a16_matmul(x, w.packed)),
    }
    row: dict[str, object] = {"shape": name, "n": w.dense.shape[0], "k": w.dense.shape[1], "rows": m}
    for kind, us in times.items():
        gbs = w.bytes[kind.split("_")[0]] / us / 1e3
        row[kind] = {"us": round(us, 1), "GB/s": round(gbs), "of_copy": round(gbs / peak_gbs, 2)}
    row["fp8_new_plan"], row["w4a16_new_plan"] = fp8_new[1], w4_new[1]
    return row, times


def prefill_row(name: str, w: Weights, m: int) -> dict[str, object]:
    x = torch.randn(m, w.dense.shape[1], device=DEVICE, dtype=torch.bfloat16)
    kernels: dict[str, Callable[[], object]] = {
        "bf16": lambda: x @ w.dense.t(),
        "fp8": lambda: fp8_linear(x, w.fp8, w.fp8_scale, None, None),
        "w4a16": lambda: w4a16_matmul(x, w.packed),
    }
    flops = 2 * m * w.dense.shape[0] * w.dense.shape[1]
    row: dict[str, object] = {"shape": name, "rows": m}
    for kind, kernel in kernels.items():
        row[f"{kind}_tflops"] = round(flops / median_us(kernel) / 1e6, 1)
    return row


def step_estimate(one_row: dict[str, dict[str, float]]) -> dict[str, float]:
    """Microseconds of one 8B decode step's linears at one row (one_row: shape -> kind -> us):
    32 x (qkv, o, gate_up, down) in each kind, plus the bf16 LM head (it stays dense)."""
    estimate: dict[str, float] = {}
    for kind in ("bf16", "fp8_new", "fp8_old", "w4a16_new", "w4a16_old"):
        per_layer = sum(one_row[shape][kind] for shape in ("qkv", "o", "gate_up", "down"))
        estimate[kind] = round(LAYERS_8B * per_layer + one_row["lm_head"]["bf16"], 1)
    for kind in ("fp8_new", "fp8_old", "w4a16_new", "w4a16_old"):
        estimate[f"{kind}_over_bf16"] = round(estimate[kind] / estimate["bf16"], 2)
    return estimate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-prefill", action="store_true", help="decode rows only")
    args = parser.parse_args()
    peak = copy_bandwidth_gbs()
    print(json.dumps({"copy_bandwidth_gbs": round(peak)}), flush=True)
    decode: list[dict[str, object]] = []
    prefill: list[dict[str, object]] = []
    one_row: dict[str, dict[str, float]] = {}
    for name, n, k in SHAPES:
        weights = Weights(n, k)
        for m in DECODE_ROWS:
            row, times = decode_row(name, weights, m, peak)
            decode.append(row)
            one_row[name] = times if m == 1 else one_row[name]
            print(json.dumps(row), flush=True)
        for m in [] if args.no_prefill else PREFILL_ROWS:
            prefill.append(prefill_row(name, weights, m))
            print(json.dumps(prefill[-1]), flush=True)
        del weights
        torch.cuda.empty_cache()
    estimate = step_estimate(one_row)
    print(json.dumps({"8b_step_linears_us_at_1_row": estimate}), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            result = {"copy_bandwidth_gbs": peak, "decode": decode, "prefill": prefill, "step": estimate}
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
