"""Speculative decoding on the CPU at concurrency 1: output tokens per second of the default model
(SmolLM2-135M-Instruct, what `batchlm serve` runs with no --model) with `--speculative` off against
auto (or ngram), on the generated input-grounded workloads (editing, summarization) and on open-ended
prompts with nothing to copy. One request at a time through the offline engine, greedy, chat template.
Modes alternate within each round (and swap order every round), so machine load hits both alike.

    python benchmarks/speculative_cpu.py --rounds 5 --prompts 3 --max-tokens 256
    python benchmarks/speculative_cpu.py --modes off ngram --workloads editing --num-speculative-tokens 6

--temperature T samples (seeded) instead of greedy decoding. A mode written `auto:chunks` (or
`ngram:chunks`) keeps verify steps in the chunk layout instead of decode rows through the fused decode
stack (runner/decode_rows.py), for A/B runs of the two. A mode written `auto:pool` (or `ngram:pool`)
also drafts from the tokens of finished requests (`--speculative-pool-tokens`, POOL_TOKENS); the
`again` workload asks each open-ended prompt twice in a row, which only such a pool can draft from.
--vary-prompts prefixes every prompt with its round, so that no round repeats an earlier one's requests
(with a pool, a repeated round would otherwise be drafted from the round before).
Prints one line per (round, workload, mode) and the medians with the speculative/off ratio; --save
writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from batchlm import LLM, SamplingParams
from batchlm.bench.grounded_prompts import grounded_prompts
from batchlm.core.step_io import ModelRunnerOutput, SchedulerOutput

# Open-ended requests: the answer cannot copy the prompt.
OPEN_ENDED = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a rainbow forms, as if to a six-year-old.",
    "List twelve surprising facts about honeybees.",
    "Describe in detail how vaccines train the immune system.",
)


# Tokens of finished requests a `:pool` mode keeps to draft from.
POOL_TOKENS = 65536


def workload_prompts(name: str, count: int) -> list[str]:
    if name == "open":
        return [OPEN_ENDED[i % len(OPEN_ENDED)] for i in range(count)]
    if name == "again":  # each question asked twice in a row
        return [OPEN_ENDED[i // 2 % len(OPEN_ENDED)] for i in range(2 * count)]
    return grounded_prompts(name, count)


def run_once(
    llm: LLM, prompts: list[str], max_tokens: int, batch: int = 1, temperature: float = 0.0
) -> tuple[int, float, int, int, list[list[int]]]:
    """The prompts `batch` at a time (1: sequential requests, c=1): output tokens, seconds, and the
    drafts proposed and accepted meanwhile."""
    # Seeded when sampling: speculation then gives the very same tokens, so both modes do the same work.
    params = SamplingParams(temperature=temperature, seed=7 if temperature else None, max_tokens=max_tokens)
    before = llm.engine_core.scheduler.stats()
    tokens, started, outputs = 0, time.perf_counter(), []
    for first in range(0, len(prompts), batch):
        conversations = [[{"role": "user", "content": p}] for p in prompts[first : first + batch]]
        for output in llm.chat(conversations, params, use_tqdm=False):
            tokens += len(output.outputs[0].token_ids)
            outputs.append(list(output.outputs[0].token_ids))
    seconds = time.perf_counter() - started
    after = llm.engine_core.scheduler.stats()
    proposed = after.spec_proposed_tokens_total - before.spec_proposed_tokens_total
    accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    return tokens, seconds, proposed, accepted, outputs


class StepTimer:
    """Wraps an engine's executor to time each step by kind: plain decode (one token per request, all
    decoding) or verify (some request verifies drafts); steps with prompt chunks are left out."""

    def __init__(self, llm: LLM) -> None:
        self.executor = llm.engine_core.executor
        self.times: dict[str, list[float]] = {"decode": [], "verify": []}
        llm.engine_core.executor = self  # type: ignore[assignment]

    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        started = time.perf_counter()
        result = self.executor.execute(scheduled)
        seconds = time.perf_counter() - started
        if any(c.num_draft_tokens for c in scheduled.chunks):
            self.times["verify"].append(seconds)
        elif all(len(c.token_ids) == 1 for c in scheduled.chunks):
            self.times["decode"].append(seconds)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=3, help="requests per workload per run")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=["off", "auto"])
    parser.add_argument("--workloads", nargs="+", default=["editing", "summarization", "open"])
    parser.add_argument("--num-speculative-tokens", type=int, default=None, help="default: the device's")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else seeded sampling")
    parser.add_argument(
        "--batch", type=int, default=1, help="requests started together (a batch of this size; 1 = c=1)"
    )
    parser.add_argument(
        "--speculative-max-batch", type=int, default=None, help="auto's batch limit (default: the device's)"
    )
    parser.add_argument("--vary-prompts", action="store_true", help="prefix every prompt with its round")
    parser.add_argument(
        "--pool-tokens",
        type=int,
        default=0,
        help="the other modes' n-gram pool (0: none; the device's default is on)",
    )
    parser.add_argument("--model", default="demo", help="default: the built-in default model")
    parser.add_argument("--save", default=None)
    args = parser.parse_args()

    engines = {
        mode: LLM(
            model=args.model,
            device="cpu",
            speculative=mode.split(":")[0],
            num_speculative_tokens=args.num_speculative_tokens,
            speculative_max_batch=args.speculative_max_batch,
            speculative_pool_tokens=POOL_TOKENS if mode.endswith(":pool") else args.pool_tokens,
        )
        for mode in args.modes
    }
    for mode, llm in engines.items():
        if mode.endswith(":chunks"):
            llm.engine_core.executor.input_builder.max_decode_rows = 0  # type: ignore[attr-defined]
    prompts = {name: workload_prompts(name, args.prompts) for name in args.workloads}
    for llm in engines.values():  # warm-up: kernels, allocator, prefix cache of the prompts
        run_once(llm, [prompts[name][0] for name in args.workloads], 16)
    timers = {mode: StepTimer(llm) for mode, llm in engines.items()}
    rows = []
    for round_index in range(args.rounds):
        order = args.modes if round_index % 2 == 0 else list(reversed(args.modes))
        for name in args.workloads:
            for mode in order:
                asked = [f"(Round {round_index}) {p}" for p in prompts[name]]
                tokens, seconds, proposed, accepted, outputs = run_once(
                    engines[mode],
                    asked if args.vary_prompts else prompts[name],
                    args.max_tokens,
                    args.batch,
                    args.temperature,
                )
                row = {
                    "round": round_index,
                    "workload": name,
                    "mode": mode,
                    "tokens": tokens,
                    "seconds": seconds,
                    "tok_s": tokens / seconds,
                    "proposed": proposed,
                    "accepted": accepted,
                    "outputs": outputs,
                }
                rows.append(row)
                rate = f"{accepted / proposed:.0%}" if proposed else "-"
                print(
                    f"round {round_index} {name:13s} {mode:11s} {tokens:5d} tokens {seconds:6.2f} s "
                    f"{tokens / seconds:6.1f} tok/s  accepted {accepted}/{proposed} ({rate})",
                    flush=True,
                )
    same = [
        r["outputs"] == o["outputs"]
        for r in rows
        for o in rows
        if r["mode"] == args.modes[0]
        and o["mode"] != r["mode"]
        and (o["round"], o["workload"]) == (r["round"], r["workload"])
    ]
    print(f"\ngreedy outputs identical to {args.modes[0]}'s in {sum(same)} of {len(same)} runs")
    print(f"medians (output tok/s, {args.batch} request(s) at a time):")
    base = args.modes[0]
    for name in args.workloads:
        medians = {
            mode: statistics.median(r["tok_s"] for r in rows if r["workload"] == name and r["mode"] == mode)
            for mode in args.modes
        }
        ratios = "  ".join(f"{mode}/{base} {medians[mode] / medians[base]:.2f}x" for mode in args.modes[1:])
        values = "  ".join(f"{mode} {medians[mode]:.1f}" for mode in args.modes)
        print(f"  {name:13s} {values}  {ratios}")
    print("median step time (ms), steps timed:")
    for mode, timer in timers.items():
        parts = [
            f"{kind} {1000 * statistics.median(times):.1f} ({len(times)})"
            for kind, times in timer.times.items()
            if times
        ]
        print(f"  {mode:11s} " + "  ".join(parts))
    if args.save:
        Path(args.save).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
