"""The grouped GEMM's launch shapes (kernels/moe_gemm.py `GroupedTile`) swept at decode token counts on
MoE expert shapes, in bf16, FP8 or 4-bit stacks: what `tile_for` picks against every shape of a grid.

Per shape, token count and projection (gate/up, down): random routing of that many tokens, the
grouped GEMM alone on `--layers` copies of the stack cycled (so the weights come from memory), in a
CUDA graph; median microseconds of 7 replays per launch shape, the fastest three, and the chosen
experts' bytes a second with tile_for's pick and with the fastest, and every shape's time (`every`,
N x K x warps x stages). One JSON line per case.

    python benchmarks/moe_tile_sweep.py --shapes qwen3-30b-a3b mixtral-8x7b --tokens 1 4 16 64
    python benchmarks/moe_tile_sweep.py --shapes qwen3-30b-a3b --format fp8
    python benchmarks/moe_tile_sweep.py --shapes qwen3-30b-a3b --format int4 --tokens 1 16 64 256 1024
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from collections.abc import Callable
from dataclasses import replace
from unittest import mock

import torch

from batchlm.kernels import moe_gemm
from batchlm.kernels.fp8_stack import Fp8Stack
from batchlm.kernels.int4_stack import Int4Stack
from batchlm.kernels.moe_gemm import GroupedTile, grouped_gemm
from batchlm.kernels.parallel_compile import compile_deferred, defer_compiles
from batchlm.layers.moe_routing import ExpertBlocks, align_to_blocks, route_top_k

DEVICE = torch.device("cuda")
# experts, hidden size, intermediate size, experts a token
EXPERT_SHAPES = {
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "gpt-oss-20b": (32, 2880, 2880, 4),
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "qwen2-57b-a14b": (64, 3584, 2560, 8),
}
GRID = [
    GroupedTile(n, k, 4, stages) for n, k, stages in itertools.product((32, 64, 128), (64, 128, 256), (3, 4))
]
GRID += [
    GroupedTile(16, 128, 4, 4),
    GroupedTile(16, 256, 4, 3),
    GroupedTile(128, 128, 8, 3),
    GroupedTile(256, 64, 8, 3),
    GroupedTile(64, 256, 8, 3),
]
REPLAYS = 7

Stack = torch.Tensor | Fp8Stack | Int4Stack
INT4_GROUP = 128


def random_stack(experts: int, n: int, k: int, form: str, generator: torch.Generator) -> Stack:
    if form == "int4":  # random codes, groups of 128 (a step of the kernel is one group)
        codes = torch.randint(
            0, 256, (experts, n, k // 2), device=DEVICE, dtype=torch.uint8, generator=generator
        )
        groups = (experts, n, k // INT4_GROUP)
        scales = torch.full(groups, 0.002, device=DEVICE, dtype=torch.bfloat16)
        return Int4Stack(codes, scales, torch.full(groups, 8, device=DEVICE, dtype=torch.uint8))
    weights = torch.randn(experts, n, k, device=DEVICE, dtype=torch.bfloat16, generator=generator) * 0.02
    if form == "fp8":
        return Fp8Stack(
            (weights * 20000).to(torch.float8_e4m3fn), torch.full((experts, n), 5e-5, device=DEVICE)
        )
    return weights


def graph_us(launch: Callable[[], object]) -> float:
    """Median microseconds of one replay of `launch` captured in a CUDA graph."""
    launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return sorted(times)[REPLAYS // 2]


def run_layers(x: torch.Tensor, layers: list[Stack], blocks: ExpertBlocks) -> None:
    for weights in layers:
        grouped_gemm(x, weights, blocks, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b"], choices=sorted(EXPERT_SHAPES))
    parser.add_argument("--format", default="bf16", choices=["bf16", "fp8", "int4"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--layers", type=int, default=8, help="stack copies cycled per timing")
    args = parser.parse_args()
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    form: moe_gemm.StackForm = {"fp8": "fp8", "int4": "packed"}.get(args.format, "dense")
    # A 4-bit launch steps through K a group at a time, whatever the tile says: one shape per rest.
    grid = (
        list(dict.fromkeys(replace(t, block_k=INT4_GROUP) for t in GRID)) if args.format == "int4" else GRID
    )
    chosen_tile = moe_gemm.tile_for
    for shape in args.shapes:
        experts, hidden, inter, top_k = EXPERT_SHAPES[shape]
        stacks = {
            "gate_up": [
                random_stack(experts, 2 * inter, hidden, args.format, generator) for _ in range(args.layers)
            ],
            "down": [
                random_stack(experts, hidden, inter, args.format, generator) for _ in range(args.layers)
            ],
        }
        cases = []
        for tokens in args.tokens:
            choice = route_top_k(
                torch.randn(tokens, experts, device=DEVICE, generator=generator), top_k, True
            )
            block_m = moe_gemm.block_m_for(tokens * top_k, experts)
            blocks = align_to_blocks(choice.experts, experts, block_m)
            used = int(choice.experts.unique().numel())
            for projection, layers in stacks.items():
                x = torch.randn(tokens * top_k, layers[0].shape[2], device=DEVICE, dtype=torch.bfloat16)
                cases.append((tokens, projection, block_m, blocks, used, layers, x))
        with defer_compiles() as deferred:  # every variant compiled together, on a thread pool
            for tile in grid:
                with mock.patch.object(moe_gemm, "tile_for", lambda n, m, f, r, tile=tile: tile):
                    for _, _, _, blocks, _, layers, x in cases:
                        grouped_gemm(x, layers[0], blocks, 1)
        compile_deferred(deferred, 16)
        for tokens, projection, block_m, blocks, used, layers, x in cases:
            launch = functools.partial(run_layers, x, layers, blocks)
            n, k = layers[0].shape[1], layers[0].shape[2]
            expert_bytes = n * k * {"fp8": 1.0, "int4": 0.5}.get(args.format, 2.0)
            timed = []
            for tile in grid:
                with mock.patch.object(moe_gemm, "tile_for", lambda n, m, f, r, tile=tile: tile):
                    try:
                        us = graph_us(launch) / len(layers)
                    except Exception as error:  # out of shared memory on this GPU: not ranked
                        print(json.dumps({"failed": str(tile), "error": str(error)[:100]}), flush=True)
                        continue
                timed.append((us, tile))
            timed.sort(key=lambda pair: pair[0])
            pick = chosen_tile(n, block_m, form, tokens * top_k / experts)
            if args.format == "int4":
                pick = replace(pick, block_k=INT4_GROUP)
            pick_us = next((us for us, tile in timed if tile == pick), None)
            if pick_us is None:
                pick_us = graph_us(launch) / len(layers)
            line = {
                "shape": shape, "format": args.format, "tokens": tokens, "projection": projection, "n": n, "k": k,
                "block_m": block_m, "experts": used, "tile_for": [pick.block_n, pick.block_k, pick.num_warps,
                pick.num_stages], "tile_for_us": round(pick_us, 2), "best_us": round(timed[0][0], 2),
                "tile_for_GBps": round(used * expert_bytes / pick_us / 1e3, 1),
                "best_GBps": round(used * expert_bytes / timed[0][0] / 1e3, 1),
                "fastest": [(round(us, 2), t.block_n, t.block_k, t.num_warps, t.num_stages) for us, t in timed[:3]],
                "every": {f"{t.block_n}x{t.block_k}x{t.num_warps}x{t.num_stages}": round(us, 2) for us, t in timed},
            }  # fmt: skip
            print(json.dumps(line), flush=True)
        del stacks, cases
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
