"""Pickle round trip of one decode step's outputs on the core -> front end pipe: the StepOutputs
message, against the same columns as a bare tuple (the wire form before the messages were typed) and
against one EngineCoreOutput object per sequence.

    python benchmarks/step_outputs_pickle.py --sequences 256 --runs 5
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time
from collections.abc import Callable

from batchlm.core.facts import EngineStats
from batchlm.executor.core_messages import StepOutputs
from batchlm.outputs import CoreOutputs, EngineCoreOutput, FinishReason


def step_outputs(sequences: int) -> list[EngineCoreOutput]:
    outputs = [EngineCoreOutput(f"cmpl-{index:032x}-0", (1000 + index,)) for index in range(sequences)]
    outputs[0] = EngineCoreOutput(
        outputs[0].request_id, (7,), finish_reason=FinishReason.STOP, stop_token_id=7
    )
    return outputs


def as_tuple(outputs: list[EngineCoreOutput], stats: EngineStats) -> object:
    columns = CoreOutputs.of(outputs)
    return ("outputs", ((columns.request_ids, columns.token_ids, list(columns.whole.items())), stats))


def round_trip_us(build: Callable[[], object], repeats: int) -> float:
    """Build on the core's side, pickle, unpickle and unpack on the front end's: microseconds each."""
    started = time.perf_counter()
    for _ in range(repeats):
        received = pickle.loads(pickle.dumps(build(), protocol=pickle.HIGHEST_PROTOCOL))
        if isinstance(received, StepOutputs):
            received.unpack()
        elif isinstance(received[1][0], tuple):  # the bare columns, unpacked as before
            request_ids, token_ids, whole = received[1][0]
            unpacked = [EngineCoreOutput(r, t) for r, t in zip(request_ids, token_ids, strict=True)]
            for index, output in whole:
                unpacked[index] = output
    return 1e6 * (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    outputs, stats = step_outputs(args.sequences), EngineStats(num_running=args.sequences)
    variants: dict[str, Callable[[], object]] = {
        "StepOutputs message": lambda: StepOutputs(CoreOutputs.of(outputs), stats),
        "bare tuple of the same columns": lambda: as_tuple(outputs, stats),
        "one object per sequence": lambda: ("outputs", (outputs, stats)),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.runs):  # alternate the variants so machine load hits them alike
        for name, build in variants.items():
            results[name].append(round_trip_us(build, args.repeats))
    for name, times in results.items():
        size = len(pickle.dumps(variants[name](), protocol=pickle.HIGHEST_PROTOCOL))
        runs = " / ".join(f"{t:.1f}" for t in times)
        print(f"{name:38s} {size:7d} B  median {statistics.median(times):7.1f} us  ({runs})")


if __name__ == "__main__":
    main()
