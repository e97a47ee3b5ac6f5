"""What scoring a prompt costs (SamplingParams.prompt_logprobs, what completions' echo with logprobs asks):
the same prompts prefilled for one token each, with and without their prompt's logprobs, in one process.

    python benchmarks/prompt_logprobs_cost.py --model default --prompts 8 --prompt-len 512 --runs 3
    python benchmarks/prompt_logprobs_cost.py --shape llama-3.2-1b --device cuda --prompts 64 --runs 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from batchlm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--shape", help="a benchmarks/model_shapes.py shape with random weights, instead of --model"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--top", type=int, nargs="+", default=[0, 5], help="prompt_logprobs values to time")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    if args.shape:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from model_shapes import dummy_llm

        llm = dummy_llm(args.shape, args.prompts, args.prompt_len + 8, device=args.device)
    else:
        llm = LLM(model=args.model, device=args.device)
    vocab = llm.info.vocab_size
    rng = random.Random(0)
    # Distinct prompts: no run reads another's blocks from the prefix cache.
    settings: list[int | None] = [None, *args.top]
    timings: dict[str, list[float]] = {str(top): [] for top in settings}
    for run in range(args.runs):
        for top in settings:  # interleaved, so load on the machine falls on every setting alike
            prompts = [
                [rng.randrange(100, vocab) for _ in range(args.prompt_len)] for _ in range(args.prompts)
            ]
            params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=top)
            started = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            timings[str(top)].append(time.perf_counter() - started)
            print(
                json.dumps({"run": run, "prompt_logprobs": top, "seconds": round(timings[str(top)][-1], 3)})
            )
    base = statistics.median(timings["None"])
    summary = {
        key: {
            "median_s": round(statistics.median(values), 3),
            "vs_plain": round(statistics.median(values) / base, 3),
        }
        for key, values in timings.items()
    }
    print(json.dumps({"prompts": args.prompts, "prompt_len": args.prompt_len, "summary": summary}))


if __name__ == "__main__":
    main()
