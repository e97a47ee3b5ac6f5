"""Host time of building one verify step's inputs, laid out as chunks against as decode rows
(runner/decode_rows.py: the layout that lets verify steps replay the decode CUDA graphs). CPU only: it
times the numpy work of StepInputBuilder.build, which a speculating request waits for every step.

    python benchmarks/decode_rows_host.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import torch

from batchlm.core.step_io import ScheduledChunk, SchedulerOutput
from batchlm.runner.inputs import StepInputBuilder

CONTEXT = 600  # tokens before each verify chunk
TABLE_BLOCKS = 40  # blocks of 16 in each request's table


def verify_step(requests: int, drafts: int, with_tables: bool) -> SchedulerOutput:
    """`requests` verify chunks of 1 + drafts tokens; the first step sends the block tables."""
    chunks = tuple(
        ScheduledChunk(
            f"r{index}",
            tuple(range(1 + drafts)),
            CONTEXT,
            tuple(range(index * TABLE_BLOCKS, (index + 1) * TABLE_BLOCKS)) if with_tables else (),
            True,
            drafts,
        )
        for index in range(requests)
    )
    return SchedulerOutput(chunks, (), frozenset())


def build_microseconds(requests: int, drafts: int, max_decode_rows: int, number: int) -> float:
    builder = StepInputBuilder(16, torch.device("cpu"))
    builder.max_decode_rows = max_decode_rows
    builder.build(verify_step(requests, drafts, with_tables=True))
    step = verify_step(requests, drafts, with_tables=False)
    return min(timeit.repeat(lambda: builder.build(step), number=number, repeat=3)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--drafts", type=int, default=4)
    parser.add_argument("--number", type=int, default=200, help="builds per timing")
    args = parser.parse_args()
    for requests in (1, 16):
        times: dict[str, list[float]] = {"chunks": [], "decode rows": []}
        for _ in range(args.rounds):  # layouts alternate, so machine load hits both alike
            times["chunks"].append(build_microseconds(requests, args.drafts, 0, args.number))
            times["decode rows"].append(build_microseconds(requests, args.drafts, 1 << 16, args.number))
        chunks, rows = (statistics.median(values) for values in times.values())
        print(
            f"{requests:2d} verify chunks of 1 + {args.drafts}: chunks {chunks:.1f} us, "
            f"decode rows {rows:.1f} us ({rows / chunks:.2f}x)"
        )


if __name__ == "__main__":
    main()
