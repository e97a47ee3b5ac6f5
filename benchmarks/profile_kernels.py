"""GPU kernel-time breakdown of decode-heavy steps (torch.profiler), and how many steps replayed a CUDA graph.

python benchmarks/profile_kernels.py --shape llama-3.2-1b --num-requests 256 --input-len 512 --output-len 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_shapes import write_config_only
from offline_throughput import make_prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    from batchlm import LLM, SamplingParams

    model_dir = write_config_only(args.shape, Path(tempfile.gettempdir()) / f"batchlm-bench-{args.shape}")
    llm = LLM(
        model=str(model_dir),
        load_format="dummy",
        max_model_len=args.input_len + args.output_len + 16,
        max_num_seqs=args.num_requests,
        enable_prefix_caching=False,
        enforce_eager=args.enforce_eager,
    )
    prompts = make_prompts(args.num_requests, args.input_len, llm.info.vocab_size, 0)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=1.0, detokenize=False)
    llm.generate(prompts, params)  # warm-up: every prefill and decode shape once
    runner = llm.engine_core.executor
    graphs = getattr(runner, "decode_graphs", None)
    replays = {"graph": 0, "eager": 0}
    if graphs is not None:
        original = graphs.run

        def counted(*a, **k):  # type: ignore[no-untyped-def]
            replays["graph"] += 1
            return original(*a, **k)

        graphs.run = counted
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params)
        torch.cuda.synchronize()
    print(f"steps {llm.engine_core.num_steps}, graph replays in the profiled run: {replays['graph']}")
    print(
        prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=70
        )
    )


if __name__ == "__main__":
    main()
