"""Micro-benchmark of the Triton paged-attention kernels against the GPU's own copy bandwidth.

Decode is memory-bound: its floor is the KV bytes it must read over the device-to-device copy rate
measured in the same run (read + write bytes counted). Prefill is reported in TFLOP/s next to torch's
scaled_dot_product_attention on the same (contiguous, unpaged) tensors.

    PYTHONPATH=src python benchmarks/attention_kernels.py [--json out.json] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from batchlm.kernels.kv_write import write_kv_cache
from batchlm.kernels.paged_decode import (
    DecodeConfig,
    default_decode_config,
    paged_decode_attention,
)
from batchlm.kernels.paged_prefill import PrefillConfig, paged_prefill_attention
from batchlm.kernels.shapes import choose_num_splits, sm_count

DTYPE = torch.bfloat16
ELEM = 2  # bytes per bf16 element


@dataclass
class Row:
    name: str
    ms: float
    metric: float  # GB/s for memory-bound rows, TFLOP/s for prefill rows
    unit: str
    of_peak: float  # metric over the measured ceiling


def median_ms(fn: Callable[[], object]) -> float:
    """Median of event-timed runs, L2 flushed before each (triton's do_bench)."""
    return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6  # bytes read + written


def paged_setup(
    batch: int, context: int, kv_heads: int, head_dim: int, block_size: int, cache_dtype: torch.dtype = DTYPE
):
    """A cache holding `batch` contexts on shuffled blocks, with their tables and lengths."""
    per_seq = math.ceil(context / block_size)
    num_blocks = batch * per_seq
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=DTYPE)
    cache = cache.to(cache_dtype)
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return cache, tables.contiguous(), seq_lens


DecodeVariant = tuple[str, DecodeConfig, int | None]  # label, config, forced splits (None = auto)


def graph_ms(fn: Callable[[], object]) -> float:
    """Median time of one call captured in a CUDA graph, L2 flushed before each replay: the GPU time
    a graph-captured decode step sees, without the Python launch overhead eager timing includes."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay)


def decode_sweep(batch: int, cache_dtype: torch.dtype = DTYPE) -> list[DecodeVariant]:
    """Tile, warp and stage variants (for an FP8 cache, also with its values widened by a cast or in
    registers); split counts where the batch alone cannot fill the GPU."""
    variants: list[DecodeVariant] = []
    for n, w, st in ((64, 4, 3), (32, 4, 2), (128, 8, 2), (128, 4, 3)):
        variants.append((f"n{n}w{w}s{st}", DecodeConfig(n, w, st), None))
    if cache_dtype == torch.float8_e4m3fn:  # beside n128w4s3 above (values widened by a cast)
        variants.append(("n128w4s2", DecodeConfig(128, 4, 2), None))
        for st in (2, 3):
            variants.append(
                (
                    f"n128w4s{st} values widened in registers",
                    DecodeConfig(128, 4, st, fp8_in_registers=True),
                    None,
                )
            )
    if batch * 8 < 528:  # fewer programs than 4 per SM: splits matter
        variants += [(f"splits={splits}", DecodeConfig(), splits) for splits in (1, 2, 4, 8, 16, 32, 64, 128)]
    return variants


def bench_decode(
    batch: int,
    context: int,
    peak: float,
    sweep: bool,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 64,
    cache_dtype: torch.dtype = DTYPE,
) -> list[Row]:
    cache, tables, seq_lens = paged_setup(batch, context, kv_heads, head_dim, 16, cache_dtype)
    query = torch.randn(batch, heads, head_dim, device="cuda", dtype=DTYPE)
    out = torch.empty_like(query)
    kv_bytes = 2 * batch * context * kv_heads * head_dim * cache.element_size()
    dtype_label = "" if cache_dtype == DTYPE else f" {str(cache_dtype).removeprefix('torch.')} cache"
    auto = choose_num_splits(batch, kv_heads, tables.shape[1] * 16, sm_count(query.device))
    variants: list[DecodeVariant] = [(f"default (splits={auto})", default_decode_config(cache_dtype), None)]
    variants += decode_sweep(batch, cache_dtype) if sweep else []
    rows = []
    for label, cfg, splits_override in variants:
        fn = lambda c=cfg, s=splits_override: paged_decode_attention(  # noqa: E731
            query, cache, seq_lens, tables, 0.125, out=out, num_splits=s, config=c
        )
        ms = graph_ms(fn)
        gbs = kv_bytes / ms / 1e6
        name = f"decode B={batch} ctx={context} D={head_dim}{dtype_label} {label}"
        rows.append(Row(name, ms, gbs, "GB/s", gbs / peak))
    ms = median_ms(lambda: paged_decode_attention(query, cache, seq_lens, tables, 0.125, out=out))
    gbs = kv_bytes / ms / 1e6
    name = f"decode B={batch} ctx={context} D={head_dim}{dtype_label} default, eager launch"
    rows.append(Row(name, ms, gbs, "GB/s", gbs / peak))
    return rows


def bench_kv_write(tokens: int, peak: float, kv_heads: int = 8, head_dim: int = 64) -> list[Row]:
    """Our kernel (skips slot -1 on the device) next to torch's index_copy_ (cannot skip)."""
    cache, _, _ = paged_setup(64, 2048, kv_heads, head_dim, 16)
    key = torch.randn(tokens, kv_heads, head_dim, device="cuda", dtype=DTYPE)
    value = torch.randn_like(key)
    slots = torch.randperm(cache.shape[1] * 16, device="cuda")[:tokens]
    flat = cache.view(2, -1, kv_heads, head_dim)
    moved = 2 * 2 * key.numel() * ELEM  # read k, v; write both

    def torch_write() -> None:
        flat[0].index_copy_(0, slots, key)
        flat[1].index_copy_(0, slots, value)

    rows = []
    for label, fn in (
        ("triton", lambda: write_kv_cache(key, value, cache, slots)),
        ("torch index_copy_", torch_write),
    ):
        ms = graph_ms(fn)
        rows.append(
            Row(f"kv write T={tokens} {label}", ms, moved / ms / 1e6, "GB/s", moved / ms / 1e6 / peak)
        )
    return rows


PREFILL_SWEEP = {
    0: ((128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 3)),  # long-context extend, D=128
    64: ((128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 4), (128, 32, 8, 3), (64, 128, 4, 2),
         (64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3), (256, 64, 8, 2)),
    128: ((128, 64, 8, 2), (128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 2), (128, 16, 8, 2), (64, 64, 4, 3)),
}  # fmt: skip


def bench_prefill(
    batch: int, length: int, context: int, sweep: bool, head_dim: int = 64, heads: int = 32, kv_heads: int = 8
) -> list[Row]:
    """`batch` requests of `length` new tokens after `context` cached ones."""
    cache, tables, seq_lens = paged_setup(batch, context + length, kv_heads, head_dim, 16)
    query = torch.randn(batch * length, heads, head_dim, device="cuda", dtype=DTYPE)
    starts = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * length
    # Causal: each new token sees the context and, on average, half the chunk.
    flops = batch * 4 * heads * head_dim * length * (context + length / 2)
    configs: list[tuple[str, PrefillConfig | None]] = [("default", None)]
    if sweep:
        variants = PREFILL_SWEEP[head_dim if context == 0 else 0]
        configs += [(f"m{m}n{n}w{w}s{st}", PrefillConfig(m, n, w, st)) for m, n, w, st in variants]
    name = f"prefill {batch}x{length} ctx={context} D={head_dim}"
    rows = []
    for label, cfg in configs:
        fn = lambda c=cfg: paged_prefill_attention(  # noqa: E731
            query, cache, starts, seq_lens, tables, 0.125, length, config=c
        )
        ms = median_ms(fn)
        rows.append(Row(f"{name} paged {label}", ms, flops / ms / 1e9, "TFLOP/s", 0.0))
    if context == 0:  # peer: torch SDPA (flash) on contiguous [B, H, L, D] tensors, same math
        q = query.view(batch, length, heads, head_dim).transpose(1, 2)
        k = torch.randn(batch, kv_heads, length, head_dim, device="cuda", dtype=DTYPE)
        ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True))
        rows.append(Row(f"{name} torch sdpa (contiguous)", ms, flops / ms / 1e9, "TFLOP/s", 0.0))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write all rows here as JSON")
    parser.add_argument("--sweep", action="store_true", help="also time decode tile/split variants")
    parser.add_argument(
        "--long-prefill",
        action="store_true",
        help="only the prefill of one 8,000-token prompt (Llama-3.2-1B heads)",
    )
    args = parser.parse_args()
    if args.long_prefill:
        for row in bench_prefill(1, 8000, 0, args.sweep, head_dim=64):
            print(f"{row.name:<62} {row.ms:9.4f} {row.metric:10.1f} {row.unit:<8}")
        return
    peak = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {peak:.0f} GB/s (read + write)")
    rows = [Row("d2d copy 1 GiB", 0.0, peak, "GB/s", 1.0)]
    rows += bench_decode(256, 768, peak, args.sweep)
    rows += bench_decode(1, 32768, peak, args.sweep)
    # W2's decode (Llama-3.1-8B heads, 512 requests at ~1,500 tokens): a bf16 cache against an FP8 one.
    for cache_dtype in (DTYPE, torch.float8_e4m3fn):
        rows += bench_decode(512, 1500, peak, args.sweep, head_dim=128, cache_dtype=cache_dtype)
    if args.sweep:  # calibrate the split heuristic on mid-size batches
        for batch, context in ((4, 8192), (16, 4096), (32, 2048), (64, 2048)):
            rows += bench_decode(batch, context, peak, sweep=True)
    rows += bench_kv_write(256, peak) + bench_kv_write(8192, peak)
    rows += bench_prefill(4, 2048, 0, args.sweep, head_dim=64)
    rows += bench_prefill(4, 2048, 0, args.sweep, head_dim=128)
    rows += bench_prefill(1, 512, 16384, args.sweep, head_dim=128)
    rows += bench_prefill(4, 256, 8192, args.sweep, head_dim=128)
    print(f"{'case':<62} {'ms':>9} {'rate':>10} {'unit':<8} {'of peak':>7}")
    for row in rows:
        share = f"{row.of_peak:7.1%}" if row.of_peak else ""
        print(f"{row.name:<62} {row.ms:9.4f} {row.metric:10.1f} {row.unit:<8} {share}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"device": torch.cuda.get_device_name(), "rows": [asdict(r) for r in rows]}, handle, indent=1
            )


if __name__ == "__main__":
    main()
