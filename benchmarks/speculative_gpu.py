"""Speculative decoding on the GPU: output tokens per second with `--speculative` off against auto (or
ngram) on a random-weight model of a real shape, one request at a time (c=1) and 16 at once (c=16),
on prompts that repeat a phrase, greedy (drafts found in the prompt and in the looping output), and on
random prompts sampled at temperature 1 (nothing to copy: drafts are almost never accepted).
Both engines live in one process (each gets part of the GPU memory); modes alternate within each
round, so clock and thermal drift hit both alike.

    python benchmarks/speculative_gpu.py --shape llama-3.2-1b --runs 3
    python benchmarks/speculative_gpu.py --shape llama-3.1-8b --runs 2 --modes off auto ngram

A random model's own acceptance rate is printed beside each number (it is not a real model's): the
ratio to read is tok/s against acceptance, and at c=16 whether auto costs anything. The step-time
columns (ms per engine step) show what a verify step costs against a decode step.
Prints one JSON line per run and a summary of medians.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_shapes import SHAPES, write_config_only


def make_prompts(kind: str, count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """ "repeat": a 32-token phrase repeated to `length`; "random": `length` random ids."""
    rng = random.Random(f"{kind}:{seed}")
    prompts = []
    for _ in range(count):
        if kind == "repeat":
            phrase = [rng.randrange(16, vocab) for _ in range(32)]
            prompts.append((phrase * (length // 32 + 1))[:length])
        else:
            prompts.append([rng.randrange(16, vocab) for _ in range(length)])
    return prompts


def run(
    llm: Any, prompts: list[list[int]], batch: int, output_len: int, temperature: float
) -> dict[str, float]:
    from batchlm import SamplingParams

    params = SamplingParams(
        temperature=temperature, seed=1, max_tokens=output_len, ignore_eos=True, detokenize=False
    )
    core = llm.engine_core
    before, steps_before = core.scheduler.stats(), core.num_steps
    tokens, started = 0, time.perf_counter()
    for first in range(0, len(prompts), batch):
        for output in llm.generate(prompts[first : first + batch], params):
            tokens += len(output.outputs[0].token_ids)
    seconds = time.perf_counter() - started
    after = core.scheduler.stats()
    proposed = after.spec_proposed_tokens_total - before.spec_proposed_tokens_total
    accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    steps = core.num_steps - steps_before
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "ms_per_step": 1000 * seconds / max(steps, 1),
        "acceptance": accepted / proposed if proposed else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["off", "auto"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--c1-requests", type=int, default=2, help="sequential requests per c=1 run")
    parser.add_argument("--num-speculative-tokens", type=int, default=None, help="default: the device's")
    parser.add_argument("--speculative-max-batch", type=int, default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-blocks", type=int, default=2048, help="KV blocks of 16 tokens per engine")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    from batchlm import LLM

    model_dir = Path(tempfile.gettempdir()) / f"batchlm-bench-{args.shape}"
    write_config_only(args.shape, model_dir)
    engines = {
        mode: LLM(
            model=str(model_dir),
            device=args.device,
            load_format="dummy",
            max_model_len=args.input_len + args.output_len + 16,
            max_num_seqs=max(args.batches),
            # A fixed KV cache: a later engine would count the earlier ones' memory as taken.
            num_gpu_blocks_override=args.num_blocks,
            speculative=mode,
            num_speculative_tokens=args.num_speculative_tokens,
            speculative_max_batch=args.speculative_max_batch,
        )
        for mode in args.modes
    }
    vocab = SHAPES[args.shape]["vocab_size"]
    rows = []
    for llm in engines.values():  # warm-up
        run(llm, make_prompts("random", 2, args.input_len, vocab, 99), 2, 8, 0.0)
    for index in range(args.runs):
        for batch in args.batches:
            count = args.c1_requests if batch == 1 else batch
            for kind in ("repeat", "random"):
                prompts = make_prompts(kind, count, args.input_len, vocab, index)
                for mode in args.modes if index % 2 == 0 else list(reversed(args.modes)):
                    row = {"run": index, "c": batch, "prompts": kind, "mode": mode}
                    # Nothing to copy: random prompts, sampled (a random model's greedy output loops).
                    temperature = 0.0 if kind == "repeat" else 1.0
                    row.update(run(engines[mode], prompts, batch, args.output_len, temperature))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    summary: dict[str, Any] = {"shape": args.shape, "date": time.strftime("%Y-%m-%d")}
    for batch in args.batches:
        for kind in ("repeat", "random"):
            medians = {}
            for mode in args.modes:
                mine = [r for r in rows if r["c"] == batch and r["prompts"] == kind and r["mode"] == mode]
                medians[mode] = statistics.median(r["tok_s"] for r in mine)
                summary[f"c={batch} {kind} {mode} tok/s"] = round(medians[mode], 1)
                summary[f"c={batch} {kind} {mode} ms/step"] = round(
                    statistics.median(r["ms_per_step"] for r in mine), 2
                )
                if mode != "off":
                    summary[f"c={batch} {kind} {mode} acceptance"] = round(
                        statistics.median(r["acceptance"] for r in mine), 3
                    )
            for mode in args.modes[1:]:
                summary[f"c={batch} {kind} {mode}/{args.modes[0]}"] = round(
                    medians[mode] / medians[args.modes[0]], 3
                )
    print(json.dumps(summary), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"summary": summary, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
