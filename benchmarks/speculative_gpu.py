"""Speculative decoding on the GPU: output tokens per second with `--speculative` off against auto (or
ngram), one request at a time (c=1) and 16 at once (c=16), with the acceptance rate and the time per
engine step (a verify step against a decode step).

Two kinds of model:
- `--shape NAME`: random weights of a real shape, on prompts that repeat a phrase, greedy (drafts found
  in the prompt and in the looping output), and on random prompts sampled at temperature 1 (nothing to
  copy: drafts are almost never accepted). A random model's own acceptance is not a real model's: read
  tok/s against acceptance, and at c=16 whether speculation costs anything.
- `--model PATH`: a real model (a GGUF file such as the default SmolLM2-135M-Instruct.Q4_1.gguf, which
  the GPU loads dequantized to bf16, or a model directory), through its chat template, on the bench's
  `editing` and `summarization` datasets (greedy) and on open-ended questions sampled at
  `--open-temperature` (seeded: both modes produce the same tokens): a real model's real acceptance.

All engines live in one process (each with a fixed KV cache); modes alternate within each round and
swap order every round, so clock and thermal drift hit them alike.

    python benchmarks/speculative_gpu.py --shape llama-3.2-1b --runs 3
    python benchmarks/speculative_gpu.py --shape llama-3.1-8b --runs 2 --modes off ngram
    python benchmarks/speculative_gpu.py --model SmolLM2-135M-Instruct.Q4_1.gguf --modes off ngram

On CUDA `auto` speculates only with `--speculative-max-batch N` (its CUDA default, 0, never does).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_shapes import SHAPES, write_config_only

# Open-ended requests for a real model: the answer cannot copy the prompt.
OPEN_ENDED = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a rainbow forms, as if to a six-year-old.",
    "List twelve surprising facts about honeybees.",
    "Describe in detail how vaccines train the immune system.",
    "Invent a recipe for a soup made only from autumn vegetables, with the reasons for each step.",
    "Write a letter from a cat to its owner about the new dog.",
)


@dataclass(frozen=True)
class Workload:
    """Prompts (token ids) of one kind and how they are decoded."""

    name: str
    prompts: list[list[int]]
    temperature: float
    # Random models never emit a meaningful EOS: run them to max_tokens.
    ignore_eos: bool


def shape_prompts(kind: str, count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
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


def shape_workloads(args: argparse.Namespace, count: int, seed: int) -> list[Workload]:
    vocab = SHAPES[args.shape]["vocab_size"]
    return [
        Workload("repeat", shape_prompts("repeat", count, args.input_len, vocab, seed), 0.0, True),
        Workload("random", shape_prompts("random", count, args.input_len, vocab, seed), 1.0, True),
    ]


def model_workloads(llm: Any, args: argparse.Namespace, count: int, seed: int) -> list[Workload]:
    from batchlm.bench.grounded_prompts import grounded_prompts

    def chat(texts: list[str]) -> list[list[int]]:
        return [llm.tokenizer.apply_chat_template([{"role": "user", "content": text}]) for text in texts]

    rotation = seed * count
    open_ended = [OPEN_ENDED[(rotation + i) % len(OPEN_ENDED)] for i in range(count)]
    return [
        Workload("editing", chat(grounded_prompts("editing", count, seed)), 0.0, False),
        Workload("summarization", chat(grounded_prompts("summarization", count, seed)), 0.0, False),
        Workload("open", chat(open_ended), args.open_temperature, False),
    ]


def run(llm: Any, workload: Workload, batch: int, output_len: int) -> dict[str, Any]:
    """The workload's prompts `batch` at a time: tokens, tok/s, ms per engine step, acceptance."""
    from batchlm import SamplingParams

    params = SamplingParams(
        temperature=workload.temperature,
        seed=1,
        max_tokens=output_len,
        ignore_eos=workload.ignore_eos,
        detokenize=False,
    )
    core = llm.engine_core
    before, steps_before = core.scheduler.stats(), core.num_steps
    tokens, outputs, started = 0, [], time.perf_counter()
    for first in range(0, len(workload.prompts), batch):
        for output in llm.generate(workload.prompts[first : first + batch], params, use_tqdm=False):
            tokens += len(output.outputs[0].token_ids)
            outputs.append(list(output.outputs[0].token_ids))
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
        "tokens_per_step": tokens / max(steps, 1),
        "acceptance": accepted / proposed if proposed else 0.0,
        "outputs": outputs,
    }


def build_engines(args: argparse.Namespace) -> dict[str, Any]:
    from batchlm import LLM

    if args.model:
        model, load_format, max_model_len = args.model, "auto", args.max_model_len
    else:
        model_dir = Path(tempfile.gettempdir()) / f"batchlm-bench-{args.shape}"
        write_config_only(args.shape, model_dir)
        model, load_format = str(model_dir), "dummy"
        max_model_len = args.max_model_len or args.input_len + args.output_len + 16
    return {
        mode: LLM(
            model=model,
            device=args.device,
            load_format=load_format,
            max_model_len=max_model_len,
            max_num_seqs=max(args.batches),
            # A fixed KV cache: a later engine would count the earlier ones' memory as taken.
            num_gpu_blocks_override=args.num_blocks,
            speculative=mode,
            num_speculative_tokens=args.num_speculative_tokens,
            speculative_max_batch=args.speculative_max_batch,
        )
        for mode in args.modes
    }


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    summary: dict[str, Any] = {"model": args.model or args.shape, "date": time.strftime("%Y-%m-%d")}
    base = args.modes[0]
    for batch in args.batches:
        for name in dict.fromkeys(r["workload"] for r in rows):
            medians = {}
            for mode in args.modes:
                mine = [r for r in rows if r["c"] == batch and r["workload"] == name and r["mode"] == mode]
                medians[mode] = statistics.median(r["tok_s"] for r in mine)
                prefix = f"c={batch} {name} {mode}"
                summary[f"{prefix} tok/s"] = round(medians[mode], 1)
                summary[f"{prefix} ms/step"] = round(statistics.median(r["ms_per_step"] for r in mine), 2)
                if mode != "off":
                    summary[f"{prefix} acceptance"] = round(
                        statistics.median(r["acceptance"] for r in mine), 3
                    )
                    summary[f"{prefix} same tokens"] = f"{sum(r['same_tokens'] for r in mine)}/{len(mine)}"
            for mode in args.modes[1:]:
                summary[f"c={batch} {name} {mode}/{base}"] = round(medians[mode] / medians[base], 3)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument(
        "--model", default=None, help="a real model (GGUF file or directory) instead of --shape"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["off", "auto"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens (--shape)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=None, help="--model: default 4096")
    parser.add_argument("--open-temperature", type=float, default=0.8, help="--model: the open workload's")
    parser.add_argument("--c1-requests", type=int, default=2, help="sequential requests per c=1 run")
    parser.add_argument("--num-speculative-tokens", type=int, default=None, help="default: the device's")
    parser.add_argument("--speculative-max-batch", type=int, default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-blocks", type=int, default=2048, help="KV blocks of 16 tokens per engine")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if args.model and args.max_model_len is None:
        args.max_model_len = 4096
    if "auto" in args.modes and args.speculative_max_batch is None and args.device.startswith("cuda"):
        print("note: auto never speculates on CUDA unless --speculative-max-batch N is given", flush=True)

    engines = build_engines(args)
    first = next(iter(engines.values()))

    def workloads(count: int, seed: int) -> list[Workload]:
        return model_workloads(first, args, count, seed) if args.model else shape_workloads(args, count, seed)

    for llm in engines.values():  # warm-up: allocator, kernels, the sampler's paths
        for workload in workloads(2, 99):
            run(llm, workload, 2, 8)
    rows = []
    for index in range(args.runs):
        for batch in args.batches:
            for workload in workloads(args.c1_requests if batch == 1 else batch, index):
                outputs: dict[str, Any] = {}
                for mode in args.modes if index % 2 == 0 else list(reversed(args.modes)):
                    row: dict[str, Any] = {"run": index, "c": batch, "workload": workload.name, "mode": mode}
                    row.update(run(engines[mode], workload, batch, args.output_len))
                    outputs[mode] = row.pop("outputs")
                    rows.append(row)
                for row in rows[-len(args.modes) :]:
                    # The same tokens as the first mode's (greedy, or seeded sampling)?
                    row["same_tokens"] = outputs[row["mode"]] == outputs[args.modes[0]]
                    print(json.dumps(row), flush=True)
    summary = summarize(rows, args)
    print(json.dumps(summary), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"summary": summary, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
