"""Which launch serves a linear at decode sizes, chosen per weight shape by timing a few
candidates at start-up.

A plan is keyed on the weight's shape and on the row bucket: one row (the GEMV kernels) or 2..16 rows
(the padded-dot kernels). Start-up times each candidate once per bucket, over several layers of the
shape in turn so that the weights come from memory as they do while serving (one layer's weight would
sit in L2 after the first launch), and keeps the fastest. Looking a plan up is a dict read, so
launches captured in CUDA graphs never wait on timing; an untimed shape uses the first candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

# Rows up to which the decode kernels serve (the padded dot's tile); more rows take the GEMMs.
MAX_DECODE_ROWS = 16
DECODE_DTYPES = (torch.bfloat16, torch.float16)
# Launches per candidate and layer while timing (after one that compiles and warms).
TIMING_ROUNDS = 3
# Layers of one shape a timing cycles through: together they outgrow the L2 cache.
TIMING_LAYERS = 16
# GPU clock cycles to spin before a timing (~10 ms): longer than queueing its launches takes.
QUEUE_CYCLES = 20_000_000

Plan = TypeVar("Plan")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GemvConfig:
    """One launch shape of a decode kernel: output features and inputs per program step, warps,
    pipeline stages, and the programs K is split across (the one-row kernels). x_vector: the FP8
    one-row kernel loads a step's activations once as a vector (handed to the tile's threads through
    shared memory) rather than each thread those of its own tile elements. late_sum: a one-row
    kernel (dense, FP8, W4A16) sums across threads once, after its loop, rather than every step."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    x_vector: bool = False
    late_sum: bool = False


@dataclass(frozen=True)
class PlanKey:
    """A weight shape and row bucket: `format` names the weight's kind ("fp8", "w4a16"); 4-bit
    weights add their group size."""

    format: str
    out_features: int
    in_features: int
    one_row: bool
    group_size: int = 0


def takes_decode_kernel(rows: torch.Tensor) -> bool:
    """Whether rows [M, K] go to a decode kernel: 1..16 rows of 16-bit activations on a GPU."""
    return rows.device.type == "cuda" and rows.dtype in DECODE_DTYPES and 0 < rows.shape[0] <= MAX_DECODE_ROWS


def time_launches(launches: Sequence[Callable[[], object]], rounds: int = TIMING_ROUNDS) -> float:
    """Mean microseconds of one launch, cycling through `launches` (after one warm call of each)."""
    for launch in launches:
        launch()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    # A decode kernel can take less time than Python takes to launch it: the GPU spins while the
    # launches queue up behind it, so the events time them back to back (as a graph replays them).
    torch.cuda._sleep(QUEUE_CYCLES)
    start.record()
    for _ in range(rounds):
        for launch in launches:
            launch()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) * 1000.0 / (rounds * len(launches))


class PlanTable(Generic[Plan]):
    """The chosen plan per key, filled by `tune`; `plan_for` falls back to the first candidate."""

    def __init__(self, candidates: Callable[[PlanKey], list[Plan]]) -> None:
        self.candidates = candidates
        self.chosen: dict[PlanKey, Plan] = {}

    def plan_for(self, key: PlanKey) -> Plan:
        if key in self.chosen:
            return self.chosen[key]
        return self.candidates(key)[0]

    def tune(
        self,
        key: PlanKey,
        make_launches: Callable[[Plan], Sequence[Callable[[], object]]],
        timer: Callable[[Sequence[Callable[[], object]]], float] = time_launches,
    ) -> Plan:
        """Time every candidate for `key` (make_launches: one launch per layer of the shape) and
        keep the fastest; timed again on every call, since a dry compile pass times nothing real."""
        timings = [(timer(make_launches(plan)), index) for index, plan in enumerate(self.candidates(key))]
        best_us, best_index = min(timings)
        best = self.candidates(key)[best_index]
        self.chosen[key] = best
        logger.debug(
            "decode plan for %s: %s (%.1f us; the first candidate %.1f us)", key, best, best_us, timings[0][0]
        )
        return best


def bias_of(layer: object) -> torch.Tensor | None:
    """A layer's bias, so that timing compiles the kernel variant serving will launch."""
    bias = getattr(layer, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def bucket_rows(one_row: bool) -> int:
    """The row count a bucket is timed at (its most rows: the padded dot costs the same below)."""
    return 1 if one_row else MAX_DECODE_ROWS
