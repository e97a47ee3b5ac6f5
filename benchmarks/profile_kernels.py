"""GPU kernel-time breakdown of decode steps (torch.profiler), and how many of them replayed a CUDA graph.

python benchmarks/profile_kernels.py --shape llama-3.2-1b --num-requests 256 --input-len 512
python benchmarks/profile_kernels.py --shape llama-3.1-8b --num-requests 512 --input-len 1000 \
    --quantization fp8 --kv-cache-dtype fp8

Every request is prefilled first (not profiled); then --decode-steps steps of the whole batch are,
at a context of about --input-len. With --prefill, the prefill steps themselves are profiled instead
(each request asks for one token), e.g. the long prefill:
python benchmarks/profile_kernels.py --shape llama-3.2-1b --num-requests 8 --input-len 8000 --prefill
With --output-len N as well, each request asks for N tokens and every step of the run is profiled:
the decodes of the requests already prefilled ride along with the later prompts' chunks, so the same
command at N = 1 and at N = 64 says by kernel what those decodes cost (the long prefill's 64 x 8000
in, 64 out: `--num-requests 64 --input-len 8000 --prefill --output-len 64`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_shapes import dummy_llm
from offline_throughput import make_prompts

# Prompt tokens a prefill step takes (the GPU engine's default).
PREFILL_CHUNK = 8192


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32, help="decode steps profiled")
    parser.add_argument("--quantization", default=None, help="as `batchlm serve --quantization`")
    parser.add_argument("--kv-cache-dtype", default="auto", help="as `batchlm serve --kv-cache-dtype`")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--prefill", action="store_true", help="profile the prefill steps, not decode")
    parser.add_argument(
        "--output-len", type=int, default=1, help="with --prefill: tokens each request asks for"
    )
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    from batchlm import SamplingParams
    from batchlm.request import EngineCoreRequest

    # The first requests decode while the last ones prefill (PREFILL_CHUNK tokens a step): none may
    # finish before the profiled steps end.
    prefill_steps = -(-args.num_requests * args.input_len // PREFILL_CHUNK)
    output_len = args.output_len if args.prefill else prefill_steps + args.decode_steps + 8
    llm = dummy_llm(
        args.shape,
        args.num_requests,
        args.input_len + output_len + 16,
        max_num_batched_tokens=PREFILL_CHUNK,
        enforce_eager=args.enforce_eager,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    prompts = make_prompts(args.num_requests, args.input_len, llm.info.vocab_size, 0)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=1.0, detokenize=False)
    core = llm.engine_core
    tokens = {f"r{i}": 0 for i in range(len(prompts))}
    for request_id, prompt in zip(tokens, prompts, strict=True):
        core.add_request(EngineCoreRequest(request_id, tuple(prompt), params, (), time.time()))

    def step() -> None:
        for output in core.step():
            tokens[output.request_id] += len(output.new_token_ids)

    if args.prefill:
        profile_prefill(llm, prompts, params, args.top)
        return
    # Prefill, then two decode steps of the whole batch (its graph warm).
    while min(tokens.values()) < 2:
        step()
    running = core.scheduler.stats().num_running
    if running != len(prompts):
        raise SystemExit(f"only {running} of {len(prompts)} requests are running: the KV cache is too small")
    runner = core.executor
    graphs = getattr(runner, "decode_graphs", None)
    replays = {"graph": 0}
    if graphs is not None:
        original = graphs.run

        def counted(*a, **k):  # type: ignore[no-untyped-def]
            replays["graph"] += 1
            return original(*a, **k)

        graphs.run = counted
    synchronize, activity, sort_by = profiling_mode()
    synchronize()
    with torch.profiler.profile(activities=[activity]) as prof:
        started = time.perf_counter()
        for _ in range(args.decode_steps):
            step()
        synchronize()
        elapsed = time.perf_counter() - started
    core.abort_requests(list(tokens))
    print(
        f"{args.decode_steps} decode steps of {len(prompts)} requests, {1e3 * elapsed / args.decode_steps:.2f} ms "
        f"a step (profiler on); graph replays: {replays['graph']}"
    )
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.top, max_name_column_width=70))


def profiling_mode() -> tuple[Callable[[], None], torch.profiler.ProfilerActivity, str]:
    """How to profile on this machine: the GPU's kernels when there is one, else the CPU's ops
    (synchronize, the profiler's activity, the column to sort its table by)."""
    if torch.cuda.is_available():
        return torch.cuda.synchronize, torch.profiler.ProfilerActivity.CUDA, "self_cuda_time_total"
    return (lambda: None), torch.profiler.ProfilerActivity.CPU, "self_cpu_time_total"


def profile_prefill(llm: Any, prompts: list[list[int]], params: Any, top: int) -> None:
    """One warm pass of the same prompts (its compiles and caches), then every step of a second."""
    from batchlm.request import EngineCoreRequest

    core = llm.engine_core

    def run(tag: str) -> int:
        pending = {f"{tag}{i}" for i in range(len(prompts))}
        for request_id, prompt in zip(sorted(pending), prompts, strict=True):
            core.add_request(EngineCoreRequest(request_id, tuple(prompt), params, (), time.time()))
        steps = 0
        while pending:
            steps += 1
            for output in core.step():
                if output.finished:
                    pending.discard(output.request_id)
        return steps

    synchronize, activity, sort_by = profiling_mode()
    run("warm")
    synchronize()
    with torch.profiler.profile(activities=[activity]) as prof:
        started = time.perf_counter()
        steps = run("r")
        synchronize()
        elapsed = time.perf_counter() - started
    tokens = sum(len(p) for p in prompts)
    print(
        f"{steps} steps prefilled {tokens} prompt tokens and sampled {params.max_tokens} a request in "
        f"{elapsed:.3f} s ({tokens / elapsed:,.0f} prompt tok/s, profiler on)"
    )
    print(prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=70))


if __name__ == "__main__":
    main()
