"""The engine core's host time per decode step, without a model: the real scheduler, the real step
input builder (CPU tensors) and the pipe packing, with an executor that "samples" at once.

    python benchmarks/core_host_time.py --num-requests 256 --input-len 512 --output-len 256

On a GPU this host work runs beside the device's step (async scheduling); when it takes longer than
the step, the GPU idles. Prints the mean per decode step of each phase. --offline folds the outputs
in as batchlm.LLM does (the offline benchmarks) instead of packing them for the pipe (the server).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from batchlm.core.engine_core import EngineCore
from batchlm.core.facts import EngineStats
from batchlm.core.scheduler import Scheduler
from batchlm.core.scheduler_config import SchedulerConfig
from batchlm.core.step_io import ModelRunnerOutput, SchedulerOutput
from batchlm.engine.output_processor import OutputProcessor
from batchlm.executor.core_messages import StepOutputs
from batchlm.request import EngineCoreRequest
from batchlm.runner.inputs import StepInputBuilder
from batchlm.runner.step_output import PreviousTokens
from batchlm.sampling_params import SamplingParams
from batchlm.tokenizer.tokenizer import Tokenizer

TIMES: dict[str, float] = {}


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        TIMES[name] = TIMES.get(name, 0.0) + time.perf_counter() - started
        return result

    return wrapper


class Done:
    def __init__(self, output: ModelRunnerOutput) -> None:
        self.output = output

    def result(self) -> ModelRunnerOutput:
        return self.output


class InstantExecutor:
    """Builds the step's inputs as the model runner does, then returns random tokens at once."""

    def __init__(self, block_size: int, seed: int) -> None:
        self.builder = StepInputBuilder(block_size, torch.device("cpu"))
        self.build_inputs = timed("inputs", self.builder.build)
        self.previous: PreviousTokens | None = None
        self.rng = random.Random(seed)

    def execute_async(self, scheduled: SchedulerOutput) -> Done:
        self.builder.drop(scheduled.finished_request_ids)
        if scheduled.is_empty:
            return Done(ModelRunnerOutput((), (), ()))
        self.build_inputs(scheduled, self.previous)
        ids = tuple(chunk.request_id for chunk in scheduled.chunks if chunk.sample)
        tokens = tuple(self.rng.randrange(1000) for _ in ids)
        self.previous = PreviousTokens(torch.tensor(tokens), {rid: row for row, rid in enumerate(ids)})
        return Done(ModelRunnerOutput(ids, tokens, (None,) * len(ids)))


def built_in_tokenizer() -> Tokenizer:
    from batchlm.tokenizer.builder import build_tokenizer

    directory = Path(tempfile.mkdtemp(prefix="batchlm-core-host-time-"))
    build_tokenizer(directory)
    return Tokenizer.from_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200, help="decode steps measured")
    parser.add_argument(
        "--offline",
        action="store_true",
        help="also fold the outputs in as batchlm.LLM does (OutputProcessor)",
    )
    parser.add_argument(
        "--detokenize",
        choices=["no", "at-finish", "per-token"],
        default="no",
        help="with --offline: detokenize with the built-in tokenizer, once a sequence finishes (as "
        "batchlm.LLM does) or token by token each step",
    )
    args = parser.parse_args()
    config = SchedulerConfig(
        max_num_seqs=args.num_requests,
        max_num_batched_tokens=8192,
        max_model_len=args.input_len + args.output_len + 16,
        block_size=args.block_size,
        num_blocks=args.num_requests * ((args.input_len + args.output_len) // args.block_size + 2),
        enable_prefix_caching=False,
    )
    scheduler = Scheduler(config)
    core = EngineCore(scheduler, InstantExecutor(args.block_size, 0), async_scheduling=True)  # type: ignore[arg-type]
    scheduler.schedule = timed("schedule", scheduler.schedule)  # type: ignore[method-assign]
    scheduler.update_from_output = timed("update", scheduler.update_from_output)  # type: ignore[method-assign]
    pack = timed("pack", lambda outputs: StepOutputs(outputs, EngineStats()))
    detokenize = args.detokenize != "no"
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, detokenize=detokenize)
    prompt = tuple(range(1, args.input_len + 1))
    processor = OutputProcessor(
        built_in_tokenizer() if detokenize else None, text_when_finished=args.detokenize == "at-finish"
    )
    fold_in = timed("process", lambda outputs: processor.process(outputs, delta=False, finished_only=True))
    hand_off = fold_in if args.offline else pack
    # As batchlm.LLM makes them: reported once, at the finish, unless the text is made per token.
    final_only = args.offline and args.detokenize != "per-token"
    for index in range(args.num_requests):
        core.add_request(
            EngineCoreRequest(f"r{index}", prompt, params, (0,), time.time(), final_output_only=final_only)
        )
        processor.add_request(f"r{index}", None, list(prompt), params, time.time())
    while scheduler.stats().num_waiting or scheduler.num_inflight_steps == 0:
        hand_off(core.step())  # prefill (not measured)
    for _ in range(3):
        hand_off(core.step())
    TIMES.clear()
    started, steps = time.perf_counter(), 0
    while core.has_work() and steps < args.steps:
        hand_off(core.step())
        steps += 1
    elapsed = time.perf_counter() - started
    print(
        f"{steps} decode steps of {args.num_requests} requests: {1000 * elapsed / steps:.3f} ms host time per step"
    )
    for name, total in sorted(TIMES.items(), key=lambda item: -item[1]):
        print(f"  {name:9s} {1000 * total / steps:.3f} ms")


if __name__ == "__main__":
    main()
