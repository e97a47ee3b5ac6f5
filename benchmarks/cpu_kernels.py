"""Our CPU kernels (src/batchlm/kernels/cpu_kernels.c) against the torch ops they replace, on one model
shape's real sizes with random data, on this machine's CPU:

- GEMM: every linear of all layers (distinct weights, as a forward pass streams them) and the LM head,
  at decode and prefill row counts: packed kernel vs torch's F.linear (MKL).
- Decode attention: one step's worth of requests over a paged cache: kernel vs torch's gather + SDPA
  (TorchAttentionBackend with the kernel switched off). A 256 MB read between calls evicts the cache,
  as a forward pass's weight stream does.
- Sampling: one decode step's logits: inverse-CDF kernel vs the exponential race.

    python benchmarks/cpu_kernels.py --shape smollm2-135m --rows 1 16 512 --batch 16 --context 170
    python benchmarks/cpu_kernels.py --shape gemma-3-1b --ops attention --context 2048 --window 512

--window and --softcap time a sliding-window / soft-capped layer (Gemma) on both paths.

Prints one JSON line per measurement (median of --repeats timings, milliseconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from model_shapes import SHAPES

from batchlm.attention.backend import AttentionMetadata, AttentionSpec
from batchlm.attention.torch_backend import TorchAttentionBackend, _decode_attention
from batchlm.kernels import cpu_decode_attention
from batchlm.kernels.cpu_decode_attention import decode_library
from batchlm.kernels.cpu_gemm import gemm_library, pack_weight, packed_linear
from batchlm.kernels.cpu_sampling import sample_library, sample_rows
from batchlm.sampling.sampler import fill_exponential


def median_ms(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def gemm(config: dict, rows_list: list[int], repeats: int) -> None:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim", hidden // config["num_attention_heads"])
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    shapes = [
        (qkv, hidden),
        (hidden, config["num_attention_heads"] * head_dim),
        (2 * inter, hidden),
        (hidden, inter),
    ]
    layers = [[torch.randn(n, k) * 0.02 for n, k in shapes] for _ in range(config["num_hidden_layers"])]
    packed = [[pack_weight(w) for w in ws] for ws in layers]
    head = torch.randn(config["vocab_size"], hidden) * 0.02
    head_packed = pack_weight(head)
    flops_per_row = 2 * sum(n * k for n, k in shapes) * len(layers)
    for rows in rows_list:
        inputs = {k: torch.randn(rows, k) for _, k in shapes}

        def torch_layers(inputs: dict[int, torch.Tensor] = inputs) -> None:
            for ws in layers:
                for w in ws:
                    F.linear(inputs[w.shape[1]], w)

        def kernel_layers(inputs: dict[int, torch.Tensor] = inputs) -> None:
            for ps in packed:
                for p in ps:
                    packed_linear(inputs[p.in_features], p)

        x = torch.randn(rows, hidden)
        for name, fn in (
            ("layers torch", torch_layers),
            ("layers kernel", kernel_layers),
            ("lm_head torch", lambda x=x: F.linear(x, head)),
            ("lm_head kernel", lambda x=x: packed_linear(x, head_packed)),
        ):
            ms = median_ms(fn, repeats)
            flops = flops_per_row * rows if name.startswith("layers") else 2 * rows * head.numel()
            print(
                json.dumps(
                    {
                        "op": f"gemm {name}",
                        "rows": rows,
                        "ms": round(ms, 2),
                        "gflops": round(flops / ms / 1e6, 1),
                    }
                )
            )


def attention(
    config: dict,
    batch: int,
    context: int,
    repeats: int,
    window: int | None = None,
    softcap: float | None = None,
    kv_dtype: torch.dtype = torch.float32,
) -> None:
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim", config["hidden_size"] // heads)
    block_size = 16
    per_request = -(-context // block_size)
    cache = torch.randn(2, batch * per_request + 8, block_size, kv_heads, head_dim).to(kv_dtype)
    tables = torch.randperm(cache.shape[1])[: batch * per_request].view(batch, per_request).int()
    lens = torch.full((batch,), context, dtype=torch.int32)
    query = torch.randn(batch, heads, head_dim)
    out = torch.empty_like(query)
    evict = torch.randn(64 * 1024 * 1024)

    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=lens,
        block_tables=tables,
        query_start_loc_cpu=list(range(batch + 1)),
        seq_lens_cpu=[context] * batch,
        max_query_len=1,
        max_seq_len=context,
        num_decodes=batch,
    )
    backend = TorchAttentionBackend()
    spec = AttentionSpec(head_dim**-0.5, window, softcap)

    def torch_path() -> None:
        for group in backend._decode_groups(meta, block_size):
            _decode_attention(query, cache, group, spec)

    def kernel_path() -> None:
        cpu_decode_attention.paged_decode_attention(
            query, cache, tables, lens, spec.scale, out, window, softcap
        )

    for name, fn in (("torch", torch_path), ("kernel", kernel_path)):
        for evicted in (False, True):
            ms = median_ms(fn, repeats, before=evict.sum if evicted else None)
            print(json.dumps({"op": f"decode attention {name}", "batch": batch, "context": context,
                              "window": window, "softcap": softcap, "kv_dtype": str(kv_dtype)[6:],
                              "cache": "evicted" if evicted else "warm", "ms": round(ms, 3)}))  # fmt: skip


def sampling(config: dict, batch: int, repeats: int) -> None:
    logits = torch.randn(batch, config["vocab_size"]) * 3
    generator = torch.Generator().manual_seed(0)

    def race() -> None:
        noise = torch.empty_like(logits)
        fill_exponential(noise, generator)
        logits.clone().sub_(noise.clamp_min_(torch.finfo(noise.dtype).tiny).log_()).argmax(dim=-1)

    def inverse_cdf() -> None:
        sample_rows(logits, torch.ones(batch), torch.rand(batch, dtype=torch.float64, generator=generator))

    for name, fn in (("race torch", race), ("inverse cdf kernel", inverse_cdf)):
        print(json.dumps({"op": f"sampling {name}", "batch": batch, "ms": round(median_ms(fn, repeats), 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 512])
    parser.add_argument("--batch", type=int, default=16, help="decode requests (attention, sampling)")
    parser.add_argument("--context", type=int, default=170, help="tokens per request (attention)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--window", type=int, default=None, help="sliding window of the attention layer")
    parser.add_argument("--softcap", type=float, default=None, help="attention logit soft-cap")
    parser.add_argument("--kv-dtype", choices=["float32", "float16"], default="float32",
                        help="the attention's cache dtype (float16: --kv-cache-dtype fp16)")  # fmt: skip
    parser.add_argument("--ops", nargs="+", choices=["gemm", "attention", "sampling"],
                        default=["gemm", "attention", "sampling"])  # fmt: skip
    args = parser.parse_args()
    if gemm_library() is None or decode_library() is None or sample_library() is None:
        parser.error(
            "the CPU kernels are not available here (no AVX2, no C compiler, or BATCHLM_CPU_KERNELS=0)"
        )
    config = SHAPES[args.shape]
    print(json.dumps({"shape": args.shape, "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))  # fmt: skip
    if "gemm" in args.ops:
        gemm(config, args.rows, args.repeats)
    if "attention" in args.ops:
        attention(
            config,
            args.batch,
            args.context,
            args.repeats,
            args.window,
            args.softcap,
            getattr(torch, args.kv_dtype),
        )
    if "sampling" in args.ops:
        sampling(config, args.batch, args.repeats)


if __name__ == "__main__":
    main()
