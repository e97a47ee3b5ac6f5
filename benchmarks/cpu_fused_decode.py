"""Single-request CPU decode in-process: `LLM.generate` at c=1 on a GGUF model (the fused decode
stack), after a ~140-word prompt. Each round times one generation of --tokens greedy tokens and one of
a single token (the prefill and start), and reports their difference per decode step; it also prints
the process's CPU time per step (all threads; with one thread, a figure that
other work on the machine disturbs less) and a digest of the generated token ids so that two source trees can be checked for identical output.

    python benchmarks/cpu_fused_decode.py --model smollm2-135m-q8_0.gguf --tokens 128 --rounds 5
    python benchmarks/cpu_fused_decode.py --model qwen3-0.6b-q4_k_m.gguf --words 3000 --kv-cache-dtype fp16
    python benchmarks/cpu_fused_decode.py --model gemma-3-1b-q4_k_m.gguf --tokenizer gemma-3-1b-random

Run it from two trees alternately (PYTHONPATH=tree/src) to compare builds in the same sitting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time

from batchlm import LLM, SamplingParams

WORDS = (
    "The history of the river towns along the old trade route is a story of bridges, floods and the "
    "slow work of people who kept records of every harvest, every market day and every storm that "
    "crossed the valley. "
)


def prompt_of(words: int) -> str:
    text = (WORDS * (words // len(WORDS.split()) + 1)).split()[:words]
    return " ".join(text) + "\nSummarise the passage above in detail."


def timed(llm: LLM, prompt: str, tokens: int) -> tuple[float, float, list[int], int]:
    """Wall and process CPU seconds of one generation, its token ids and the prompt's length in tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    output = llm.generate(prompt, params, use_tqdm=False)[0]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return wall, cpu, list(output.outputs[0].token_ids), len(output.prompt_token_ids)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--words", type=int, default=140)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp16", "fp32"], default="auto")
    parser.add_argument(
        "--tokenizer",
        help="a tokenizer directory instead of the file's own (gguf_shapes.py's Gemma files: the random "
        "checkpoint's directory, whose byte-level vocabulary the GGUF's SentencePiece reading does not fit)",
    )
    args = parser.parse_args()
    llm = LLM(
        model=args.model,
        tokenizer=args.tokenizer,
        device="cpu",
        speculative="off",
        enable_prefix_caching=False,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    prompt = prompt_of(args.words)
    timed(llm, prompt, 8)  # warm-up: library load, first allocations
    per_token: list[float] = []
    cpu_per_token: list[float] = []
    digest = ""
    prompt_tokens = 0
    for _ in range(args.rounds):
        full, full_cpu, ids, prompt_tokens = timed(llm, prompt, args.tokens)
        start, start_cpu, _, _ = timed(llm, prompt, 1)
        per_token.append((full - start) / (args.tokens - 1) * 1e3)
        cpu_per_token.append((full_cpu - start_cpu) / (args.tokens - 1) * 1e3)
        digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:12]
    load = os.getloadavg()[0]
    rounds = " ".join(f"{ms:.2f}" for ms in per_token)
    print(
        f"ms/token median {statistics.median(per_token):.2f} (rounds {rounds}) "
        f"cpu ms/token {statistics.median(cpu_per_token):.2f} tokens {digest} load {load:.2f} "
        f"prompt tokens {prompt_tokens}"
    )


if __name__ == "__main__":
    main()
