"""One prompt's prefill and single-stream decode on the CPU, in process: the median of 7 prefills of
an `input-len`-token prompt (prefix caching off, one output token each), then the median ITL of three
64-token greedy decodes. Run it under different environments (OpenMP wait settings, a busy
neighbour) in separate processes to compare them.

    OMP_WAIT_POLICY=ACTIVE python benchmarks/cpu_prefill_latency.py --model M --input-len 512
"""

from __future__ import annotations

import argparse
import statistics
import time

from batchlm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--input-len", type=int, default=512)
    args = parser.parse_args()
    llm = LLM(model=args.model, enable_prefix_caching=False, max_model_len=4096)
    ids = [1000 + (i * 7) % 5000 for i in range(args.input_len)]
    one = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([ids], one, use_tqdm=False)  # warm-up
    prefills = []
    for run in range(7):
        started = time.perf_counter()
        llm.generate([[i + run for i in ids]], one, use_tqdm=False)
        prefills.append(time.perf_counter() - started)
    itls = []
    for run in range(3):
        (out,) = llm.generate(
            [[5 + run, 6, 7, 8]],
            SamplingParams(max_tokens=65, temperature=0, ignore_eos=True),
            use_tqdm=False,
        )
        metrics = out.metrics
        assert metrics is not None and metrics.first_token_time and metrics.last_token_time
        itls.append((metrics.last_token_time - metrics.first_token_time) / 64)
    print(
        f"prefill {args.input_len}: {statistics.median(prefills) * 1000:.0f} ms  "
        f"decode ITL {statistics.median(itls) * 1000:.2f} ms"
    )


if __name__ == "__main__":
    main()
