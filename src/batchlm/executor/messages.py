"""The messages between the tensor-parallel executor and its worker processes, one frozen dataclass
each: the executor's calls (the same to every rank) and a rank's reply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from batchlm.core.facts import ModelFacts
from batchlm.core.step_io import ModelRunnerOutput
from batchlm.sampling_params import StructuredOutputs


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


@dataclass(frozen=True)
class CompileGrammar:
    """Compile a grammar on the rank's background compile threads, for the request the executor names
    `token` (unique per compile, so that a late report never matches a later request of the same id).
    The rank answers GrammarNews at once, without waiting for the compile."""

    token: str
    spec: StructuredOutputs
    eos_token_ids: tuple[int, ...]
    name: ClassVar[str] = "compile_grammar"


@dataclass(frozen=True)
class TakeGrammars:
    """Report the compiles finished since the last report (the rank wrote to the news pipe)."""

    name: ClassVar[str] = "take_grammars"


@dataclass(frozen=True)
class DiscardGrammars:
    """Forget these compiles (their requests were aborted)."""

    tokens: tuple[str, ...]
    name: ClassVar[str] = "discard_grammars"


WorkerCall = (
    MeasureKVBlocks
    | AllocateKVCache
    | ExecuteStep
    | StopWorker
    | CompileGrammar
    | TakeGrammars
    | DiscardGrammars
)

GrammarCall = CompileGrammar | TakeGrammars | DiscardGrammars


@dataclass(frozen=True)
class GrammarNews:
    """A rank's answer to a grammar call: the compiles finished on it since its last answer, token ->
    None (compiled) or the error that ends the request."""

    done: dict[str, str | None]


# What a call returns: a block count, the model's facts, a step's sampled tokens (rank 0 only; the
# others answer None, as they do when a rank has loaded its shard), or a rank's finished compiles.
WorkerResult = int | ModelFacts | ModelRunnerOutput | GrammarNews | None


@dataclass(frozen=True)
class WorkerReply:
    result: WorkerResult


@dataclass(frozen=True)
class WorkerFailed:
    """The rank could not start or a call raised; the worker exits after sending this."""

    reason: str
    # The rank refused its configuration as it started (a ValueError: heads that the tensor-parallel
    # size does not divide): the user's to fix, as the same refusal on one device is.
    refused: bool = False


FromWorker = WorkerReply | WorkerFailed
