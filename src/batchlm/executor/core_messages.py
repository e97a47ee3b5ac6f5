"""The messages between a front end and the engine core, one frozen dataclass each.

To the core: AddRequests, AbortRequests, Shutdown. From the core: CoreReady, CoreFailed, StepOutputs,
RequestRejected. Each side dispatches on the class (`match`), so a new message is a new class that
the type checker makes every dispatch handle.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchlm.core.facts import EngineStats, ModelFacts
from batchlm.outputs import EngineCoreOutput
from batchlm.request import EngineCoreRequest


@dataclass(frozen=True)
class AddRequests:
    requests: tuple[EngineCoreRequest, ...]


@dataclass(frozen=True)
class AbortRequests:
    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class Shutdown:
    """From the primary front end: stop the core. From another one: detach it (its requests are
    aborted)."""


ToCore = AddRequests | AbortRequests | Shutdown


@dataclass(frozen=True)
class CoreReady:
    facts: ModelFacts


@dataclass(frozen=True)
class CoreFailed:
    """The core could not start, crashed, or (front-end side) its pipe closed."""

    reason: str


@dataclass(frozen=True)
class RequestRejected:
    request_id: str
    reason: str


@dataclass(frozen=True)
class StepOutputs:
    """One step's outputs for one front end, with the core's stats after it.

    Packed as columns: request ids, new token ids, and whole only the few outputs that carry more
    (a finish, logprobs, cached tokens, an error, a scheduled time, a stop token), by position. Most
    outputs of a step are one token and nothing else, and columns pickle far faster than one object
    each, on the core's step loop."""

    request_ids: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    whole: tuple[tuple[int, EngineCoreOutput], ...]
    stats: EngineStats

    @classmethod
    def pack(cls, outputs: list[EngineCoreOutput], stats: EngineStats) -> StepOutputs:
        whole = tuple((index, output) for index, output in enumerate(outputs) if _carries_more(output))
        return cls(
            tuple(output.request_id for output in outputs),
            tuple(output.new_token_ids for output in outputs),
            whole,
            stats,
        )

    def unpack(self) -> list[EngineCoreOutput]:
        outputs = [
            EngineCoreOutput(request_id, tokens)
            for request_id, tokens in zip(self.request_ids, self.token_ids, strict=True)
        ]
        for index, output in self.whole:
            outputs[index] = output
        return outputs


def _carries_more(output: EngineCoreOutput) -> bool:
    return (
        output.finish_reason is not None
        or bool(output.new_logprobs)
        or bool(output.num_cached_tokens)
        or output.scheduled_time is not None
        or output.first_token_time is not None
        or output.error is not None
        or output.stop_token_id is not None
    )


FromCore = CoreReady | CoreFailed | StepOutputs | RequestRejected
