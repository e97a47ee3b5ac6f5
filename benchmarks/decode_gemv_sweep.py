"""Sweep of the one-row decode kernels' launch shapes (FP8: kernels/fp8_gemv.py, W4A16:
kernels/w4a16_gemv.py) at the Llama-3.1-8B and Llama-3.2-1B linear shapes, to see what the
start-up candidates (`candidate_configs`, `candidate_plans`) leave on the table.

Per shape: every grid config that fits it, timed as start-up timing does (decode_plans.time_launches:
launches queued back to back, cycling through TIMING_LAYERS layers of the shape so that weights come
from memory, not L2), median of REPEATS; next to it bf16 F.linear on the same layers and the copy
bandwidth measured in the same run. Each config's output on one layer is checked against the
dequantized weight first; one off by more than TOLERANCE is reported and not ranked. Every kernel
variant is compiled up front on a thread pool (a dry pass notes them, as start-up does).

Prints one JSON line per shape (the three fastest configs per kernel with us and share of the copy
bandwidth, and the fastest start-up candidate), then a summary: one decode step's linears per model
(bf16 LM head, as served) and the configs that placed in a top three most often.

    PYTHONPATH=src python benchmarks/decode_gemv_sweep.py --out sweep.json [--models 8b,1b] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from batchlm.kernels.decode_plans import TIMING_LAYERS, GemvConfig, time_launches
from batchlm.kernels.fp8_gemv import candidate_configs, fp8_small_m
from batchlm.kernels.int4_pack import PackedInt4, dequantize_packed
from batchlm.kernels.parallel_compile import defer_compiles
from batchlm.kernels.w4a16_gemm import W4A16Config
from batchlm.kernels.w4a16_gemv import candidate_plans
from batchlm.layers.quantization.int4 import decode_linear as w4a16_linear

DEVICE = "cuda"
GROUP = 128
REPEATS = 3
TOLERANCE = 1e-2  # max abs error over max |reference|: bf16 output rounding and fp32 sums
MODELS: dict[str, tuple[int, list[tuple[str, int, int]]]] = {
    # name: (layers, [(linear, out_features N, in_features K)]), q/k/v and gate/up fused as served
    "8b": (32, [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
                ("lm_head", 128256, 4096)]),
    "1b": (16, [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192),
                ("lm_head", 128256, 2048)]),
}  # fmt: skip

Plan = GemvConfig | W4A16Config
Json = dict[str, Any]  # one JSON object of the report


# FP8 one-row tiles (block_n, block_k, warps): 32-128 weight bytes per thread and step, i.e. two to
# eight 16-byte loads in flight per thread, from narrow N tiles (thousands of programs) to wide ones
# (few programs, split-K making up the rest); more weight rows per thread share each activation.
FP8_TILES = [
    (4, 1024, 4), (8, 512, 4), (8, 1024, 4), (16, 512, 2), (16, 512, 4),
    (16, 1024, 4), (32, 512, 4), (32, 1024, 8), (64, 256, 4),
]  # fmt: skip
# W4A16 tiles (block_n, block_k in codes = 8 x word rows, warps): 64-128 packed bytes per thread.
W4A16_TILES = [
    (64, 128, 2), (128, 64, 2), (128, 128, 2), (128, 128, 4), (256, 64, 4), (256, 128, 4),
    (256, 128, 8), (512, 32, 2), (512, 64, 4), (1024, 16, 2), (1024, 32, 4),
]  # fmt: skip


def fp8_grid(quick: bool) -> list[GemvConfig]:
    """One-row FP8 launch shapes, split-K 1-8, activations per tile element or as a vector, the
    vector form also late-summed; num_stages stays 1 (Triton does not pipeline loads that feed no
    dot: stages change nothing)."""
    splits = (1, 4) if quick else (1, 2, 4, 8)
    return [
        GemvConfig(n, k, w, 1, split, x_vector, late_sum=late)
        for n, k, w in FP8_TILES
        for split in splits
        for x_vector, late in ((False, False), (True, False), (True, True))
    ]


def w4a16_grid(quick: bool) -> list[GemvConfig]:
    """One-row W4A16 launch shapes, split-K 1-32 (a split takes whole groups), each summing across
    threads per group and late (after the loop over groups)."""
    splits = (4, 16) if quick else (1, 4, 8, 16, 32)
    return [
        GemvConfig(n, k, w, 1, split, late_sum=late)
        for n, k, w in W4A16_TILES
        for split in splits
        for late in (False, True)
    ]


def fits(config: GemvConfig, in_features: int, fmt: str) -> bool:
    """Whether the splits are no more than the K steps (FP8) or the groups (W4A16) they share out."""
    if fmt == "fp8":
        return config.split_k * config.block_k <= in_features
    return config.split_k <= in_features // GROUP


@dataclass
class Layers:
    """TIMING_LAYERS layers of one shape in the three forms, and one activation row."""

    dense: list[torch.Tensor]
    fp8: list[tuple[torch.Tensor, torch.Tensor]]
    w4a16: list[PackedInt4]
    x: torch.Tensor
    bytes: dict[str, int] = field(default_factory=dict)


def random_packed(n: int, k: int) -> PackedInt4:
    """Random words (every bit pattern is eight valid codes), scales and zero points."""
    words = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device=DEVICE)
    scales = (torch.rand(k // GROUP, n, device=DEVICE) * 0.02 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // GROUP, n), device=DEVICE).to(torch.bfloat16)
    return PackedInt4(words, scales, zeros, GROUP)


def make_layers(n: int, k: int, count: int, dense: bool) -> Layers:
    fp8, w4a16, dense_layers = [], [], []
    for _ in range(count):
        weight = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.05
        fp8.append((weight.to(torch.float8_e4m3fn), torch.rand(1, n, device=DEVICE) + 0.5))
        w4a16.append(random_packed(n, k))
        if dense:
            dense_layers.append(weight)
    x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
    sizes = {"bf16": 2 * n * k, "fp8": n * k + 4 * n, "w4a16": n * k // 2 + 2 * 2 * n * (k // GROUP)}
    return Layers(dense_layers, fp8, w4a16, x, sizes)


def launches(layers: Layers, fmt: str, plan: Plan) -> list[Callable[[], object]]:
    if fmt == "fp8":
        assert isinstance(plan, GemvConfig)
        return [functools.partial(fp8_small_m, layers.x, w, s, None, plan) for w, s in layers.fp8]
    return [functools.partial(w4a16_linear, packed, layers.x, None, plan) for packed in layers.w4a16]


def reference(layers: Layers, fmt: str) -> torch.Tensor:
    """Layer 0's product with its dequantized weight, in fp32."""
    if fmt == "fp8":
        weight, scale = layers.fp8[0]
        return layers.x.float() @ (weight.float() * scale.t()).t()
    return layers.x.float() @ dequantize_packed(layers.w4a16[0]).t()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)


def median_us(calls: Sequence[Callable[[], object]]) -> float:
    return statistics.median(time_launches(calls) for _ in range(REPEATS))


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = median_us([functools.partial(dst.copy_, src)])
    return 2 * src.numel() / us / 1e3  # bytes read + written


def label(plan: Plan) -> str:
    if isinstance(plan, W4A16Config):
        return f"gemm {plan.block_m}x{plan.block_n}x{plan.block_k} sk{plan.split_k} w{plan.num_warps}"
    vector = " xv" if plan.x_vector else ""
    late = " late" if plan.late_sum else ""
    return (
        f"{plan.block_n}x{plan.block_k} w{plan.num_warps} st{plan.num_stages} sk{plan.split_k}{vector}{late}"
    )


def plans_for(fmt: str, k: int, grid: list[GemvConfig]) -> tuple[list[Plan], list[Plan]]:
    """(the grid configs that fit, the start-up candidates) for one format and width."""
    fitting: list[Plan] = [c for c in grid if fits(c, k, fmt)]
    serving: list[Plan] = list(candidate_configs(True)) if fmt == "fp8" else candidate_plans(True, GROUP)
    return fitting, serving


def precompile(models: list[str], grids: dict[str, list[GemvConfig]], threads: int) -> tuple[int, float]:
    """Compile every variant the sweep launches (one dry pass, then a thread pool); (variants, s)."""
    from triton.runtime._async_compile import AsyncCompileMode

    start = time.perf_counter()
    widths = sorted({(n, k) for model in models for _, n, k in MODELS[model][1]})
    with defer_compiles() as deferred:
        for n, k in widths:
            layers = make_layers(n, k, 1, dense=False)
            for fmt, grid in grids.items():
                fitting, serving = plans_for(fmt, k, grid)
                for plan in fitting + serving:
                    try:
                        launches(layers, fmt, plan)[0]()
                    except Exception:  # a config that cannot launch is reported when timed
                        continue
            del layers
    if deferred is None:
        return 0, time.perf_counter() - start
    with ThreadPoolExecutor(max_workers=threads) as pool, AsyncCompileMode(pool, ignore_errors=True):
        for kernel, specialization in deferred.variants.values():
            kernel.preload(specialization)
    torch.cuda.empty_cache()
    return len(deferred), time.perf_counter() - start


def time_plans(layers: Layers, fmt: str, plans: list[Plan], ref: torch.Tensor) -> list[Json]:
    """[{config, us, of_copy, error}] per plan that launched; errors past TOLERANCE get no us."""
    rows = []
    for plan in plans:
        row: Json = {"config": label(plan), "plan": asdict(plan)}
        try:
            calls = launches(layers, fmt, plan)
            row["error"] = round(relative_error(torch.as_tensor(calls[0]()), ref), 5)
            if float(row["error"]) <= TOLERANCE:
                row["us"] = round(median_us(calls), 2)
        except Exception as error:  # out of resources, a failed compile: reported, not ranked
            row["failed"] = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        rows.append(row)
    return rows


def ranked(rows: list[Json], nbytes: int, copy_gbs: float, top: int) -> list[Json]:
    timed = sorted((r for r in rows if "us" in r), key=lambda r: float(r["us"]))
    return [
        {"config": r["config"], "us": r["us"], "of_copy": round(nbytes / float(r["us"]) / 1e3 / copy_gbs, 3)}
        for r in timed[:top]
    ]


def sweep_shape(
    model: str, name: str, n: int, k: int, grids: dict[str, list[GemvConfig]], copy_gbs: float
) -> Json:
    layers = make_layers(n, k, TIMING_LAYERS, dense=True)
    bf16_us = median_us([functools.partial(F.linear, layers.x, w) for w in layers.dense])
    line: Json = {
        "model": model, "shape": name, "n": n, "k": k,
        "bf16": {"us": round(bf16_us, 2), "of_copy": round(layers.bytes["bf16"] / bf16_us / 1e3 / copy_gbs, 3)},
    }  # fmt: skip
    details: Json = {}
    for fmt, grid in grids.items():
        fitting, serving = plans_for(fmt, k, grid)
        ref = reference(layers, fmt)
        rows = time_plans(layers, fmt, fitting, ref)
        serving_rows = time_plans(layers, fmt, serving, ref)
        line[fmt] = {
            "floor_us": round(layers.bytes[fmt] / copy_gbs / 1e3, 2),
            "top": ranked(rows, layers.bytes[fmt], copy_gbs, 3),
            "startup_pick": next(iter(ranked(serving_rows, layers.bytes[fmt], copy_gbs, 1)), None),
            "timed": sum("us" in r for r in rows),
            "wrong": [r["config"] for r in rows + serving_rows if "error" in r and "us" not in r],
            "failed": sum("failed" in r for r in rows + serving_rows),
        }
        details[fmt] = {"grid": rows, "startup_candidates": serving_rows}
    del layers
    torch.cuda.empty_cache()
    return {"line": line, "details": details}


def pick_us(line: Json, fmt: str, kind: str) -> float | None:
    """A shape's microseconds in `fmt`: the sweep's fastest ("best") or the start-up pick."""
    timing = line.get(fmt, {})
    chosen = (timing.get("top") or [None])[0] if kind == "best" else timing.get("startup_pick")
    return None if chosen is None else float(chosen["us"])


def step_summary(lines: list[Json]) -> Json:
    """Per model: one decode step's linears at one row (layers x the four layer linears + the bf16
    LM head) in bf16, and in each format with the sweep's best and the start-up pick."""
    summary: Json = {}
    for model, (count, _) in MODELS.items():
        shapes = {str(line["shape"]): line for line in lines if line["model"] == model}
        if "lm_head" not in shapes:
            continue
        head = float(shapes["lm_head"]["bf16"]["us"])
        layers = [line for shape, line in shapes.items() if shape != "lm_head"]
        bf16 = count * sum(float(line["bf16"]["us"]) for line in layers) + head
        entry: dict[str, float] = {"bf16_us": round(bf16, 1)}
        for fmt in ("fp8", "w4a16"):
            for kind in ("best", "startup"):
                times = [pick_us(line, fmt, kind) for line in layers]
                if None in times:
                    continue
                total = count * sum(t for t in times if t is not None) + head
                entry[f"{fmt}_{kind}_us"] = round(total, 1)
                entry[f"{fmt}_{kind}_over_bf16"] = round(total / bf16, 3)
        summary[model] = entry
    return summary


def frequent_winners(lines: list[Json]) -> dict[str, list[tuple[str, int]]]:
    """Per format: the configs that placed in a shape's top three, most often first."""
    winners: dict[str, list[tuple[str, int]]] = {}
    for fmt in ("fp8", "w4a16"):
        counts = Counter(str(t["config"]) for line in lines for t in line.get(fmt, {}).get("top", []))
        winners[fmt] = counts.most_common(8)
    return winners


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON file for every timing")
    parser.add_argument("--models", default="8b,1b", help="comma-separated: 8b, 1b")
    parser.add_argument("--formats", default="fp8,w4a16", help="comma-separated: fp8, w4a16")
    parser.add_argument("--quick", action="store_true", help="fewer split counts: about half of each grid")
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1), help="compile threads")
    parser.add_argument(
        "--max-seconds", type=float, default=210.0, help="shapes not started by then are skipped"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    all_grids = {"fp8": fp8_grid(args.quick), "w4a16": w4a16_grid(args.quick)}
    grids = {fmt: all_grids[fmt] for fmt in args.formats.split(",")}
    variants, compile_s = precompile(models, grids, args.threads)
    copy_gbs = copy_bandwidth_gbs()
    header = {
        "gpu": torch.cuda.get_device_name(), "copy_gbs": round(copy_gbs), "grid": {f: len(g) for f, g in grids.items()},
        "variants_compiled": variants, "compile_s": round(compile_s, 1),
    }  # fmt: skip
    print(json.dumps(header), flush=True)
    results: list[Json] = []
    skipped = []
    for model in models:
        for name, n, k in MODELS[model][1]:
            if time.perf_counter() - started > args.max_seconds:
                skipped.append(f"{model} {name}")
                continue
            results.append(sweep_shape(model, name, n, k, grids, copy_gbs))
            print(json.dumps(results[-1]["line"]), flush=True)
    lines = [r["line"] for r in results]
    summary: Json = {
        "step": step_summary(lines),
        "top3_most_often": frequent_winners(lines),
        "skipped": skipped,
    }
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)
    with open(args.out, "w") as handle:
        json.dump({"header": header, "shapes": results, "summary": summary}, handle, indent=1)


if __name__ == "__main__":
    main()
