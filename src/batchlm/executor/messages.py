"""The messages between the tensor-parallel executor and its worker processes, one frozen dataclass
each: the executor's calls (the same to every rank) and a rank's reply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from batchlm.core.facts import ModelFacts
from batchlm.core.step_io import ModelRunnerOutput


@dataclass(frozen=True)
class MeasureKVBlocks:
    """How many KV blocks fit on the rank's device (ModelRunner.determine_num_blocks)."""

    name: ClassVar[str] = "determine_num_blocks"


@dataclass(frozen=True)
class AllocateKVCache:
    """Allocate this many blocks on every rank (the minimum of their measures)."""

    num_blocks: int
    name: ClassVar[str] = "allocate_kv_cache"


@dataclass(frozen=True)
class ExecuteStep:
    """One step, as wire.encode_step made it (encoded once for all ranks)."""

    encoded: bytes
    name: ClassVar[str] = "execute"


@dataclass(frozen=True)
class StopWorker:
    name: ClassVar[str] = "shutdown"


WorkerCall = MeasureKVBlocks | AllocateKVCache | ExecuteStep | StopWorker

# What a call returns: a block count, the model's facts, a step's sampled tokens (rank 0 only; the
# others answer None, as they do when a rank has loaded its shard).
WorkerResult = int | ModelFacts | ModelRunnerOutput | None


@dataclass(frozen=True)
class WorkerReply:
    result: WorkerResult


@dataclass(frozen=True)
class WorkerFailed:
    """The rank could not start or a call raised; the worker exits after sending this."""

    reason: str


FromWorker = WorkerReply | WorkerFailed
