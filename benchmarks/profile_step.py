"""Where one engine step's time goes (scheduler, input building, forward, sampling, update, output
processing), on a workload of real shape with random weights.

    python benchmarks/profile_step.py --shape llama-3.2-1b --num-requests 256 --input-len 512 --output-len 64
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_shapes import write_config_only
from offline_throughput import make_prompts

TIMES: dict[str, float] = collections.defaultdict(float)


def timed(name: str, fn, sync: bool = False):  # type: ignore[no-untyped-def]
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        TIMES[name] += time.perf_counter() - started
        return result

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--sync", action="store_true", help="synchronize around each phase (exact GPU split)")
    args = parser.parse_args()
    from batchlm import LLM, SamplingParams

    model_dir = write_config_only(args.shape, Path(tempfile.gettempdir()) / f"batchlm-bench-{args.shape}")
    llm = LLM(model=str(model_dir), load_format="dummy", max_model_len=args.input_len + args.output_len + 16,
              max_num_seqs=args.num_requests, enable_prefix_caching=False)
    prompts = make_prompts(args.num_requests, args.input_len, llm.info.vocab_size, 0)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=1.0, detokenize=False)
    llm.generate(prompts[:4], params)
    core = llm.engine_core
    runner = core.executor
    core.scheduler.schedule = timed("schedule", core.scheduler.schedule)  # type: ignore[method-assign]
    core.scheduler.update_from_output = timed("update", core.scheduler.update_from_output)  # type: ignore[method-assign]
    import batchlm.runner.model_runner as mr

    mr.build_step_inputs = timed("inputs", mr.build_step_inputs, args.sync)
    runner._forward = timed("forward", runner._forward, args.sync)  # type: ignore[attr-defined]
    sampler = runner.sampler  # type: ignore[attr-defined]
    runner.sampler = timed("sample", sampler, args.sync)  # type: ignore[attr-defined]
    from batchlm.engine import llm as llm_module

    original_process = llm_module.OutputProcessor.process
    llm_module.OutputProcessor.process = timed("process", original_process)  # type: ignore[method-assign]
    started = time.perf_counter()
    steps_before = core.num_steps
    llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    steps = core.num_steps - steps_before
    print(f"{steps} steps in {elapsed:.2f} s ({1000 * elapsed / steps:.2f} ms/step), sync={args.sync}")
    for name, total in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        print(f"  {name:10s} {1000 * total / steps:7.3f} ms/step  {100 * total / elapsed:5.1f}%")


if __name__ == "__main__":
    main()
