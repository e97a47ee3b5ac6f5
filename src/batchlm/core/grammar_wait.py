"""The engine core's view of grammars compiled off its thread: a request under structured outputs waits
for its grammar before it is scheduled, so that compiling a large one never stalls a step (the
requests already running go on producing tokens). The compiling itself lives above the core
(structured/compiles.py); the core only asks these questions."""

from __future__ import annotations

from collections.abc import Iterable
from multiprocessing.connection import Connection
from typing import Protocol

from batchlm.request import EngineCoreRequest


class GrammarCompiles(Protocol):
    """Compiles the grammars of constrained requests on background threads."""

    @property
    def wakeup(self) -> Connection:
        """Readable once a compile has finished and take_done has news: a loop that waits on pipes
        waits on this too. Drained by take_done, and by a discard that leaves no news."""
        ...

    def start(self, request: EngineCoreRequest) -> bool:
        """Start compiling the request's grammar; True when it is ready already (compiled before), and
        the request need not wait."""
        ...

    def has_done(self) -> bool:
        """Whether compiles have finished whose requests take_done has not yet returned."""
        ...

    def take_done(self) -> dict[str, str | None]:
        """Request id -> None (its grammar is ready) or the error that ends it, for the compiles finished
        since the last call."""
        ...

    def wait_done(self) -> None:
        """Block until a compile has finished (or none is under way, or close was called)."""
        ...

    def discard(self, request_ids: Iterable[str]) -> None:
        """Forget these requests (aborted): a compile nobody else waits for is dropped if not started."""
        ...

    def close(self) -> None:
        """Drop every queued compile and forget every request, without waiting for one under way."""
        ...
