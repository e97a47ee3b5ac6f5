"""The messages between a front end and the engine core, one frozen dataclass each.

To the core: AddRequests, AbortRequests, Shutdown. From the core: CoreReady, CoreFailed, StepOutputs,
RequestRejected. Each side dispatches on the class (`match`), so a new message is a new class that
the type checker makes every dispatch handle.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchlm.core.facts import EngineStats, ModelFacts
from batchlm.outputs import CoreOutputs, EngineCoreOutput
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

    @classmethod
    def after(cls, exc: BaseException) -> CoreFailed:
        """A crash while serving, in one line: the exception's type and its message's first line. The
        traceback stays in the core's log; the reason reaches clients in their 503s."""
        lines = str(exc).strip().splitlines()
        return cls(f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)


@dataclass(frozen=True)
class RequestRejected:
    request_id: str
    reason: str


@dataclass(frozen=True)
class StepOutputs:
    """One step's outputs for one front end, in columns (CoreOutputs: they pickle far faster than one
    object each, on the core's step loop), with the core's stats after it."""

    outputs: CoreOutputs
    stats: EngineStats

    def unpack(self) -> list[EngineCoreOutput]:
        return list(self.outputs)


FromCore = CoreReady | CoreFailed | StepOutputs | RequestRejected
