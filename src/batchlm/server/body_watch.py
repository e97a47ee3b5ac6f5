"""The time limit on reading a request body: one timer for every read in progress, not one per read
(a timer per request costs the event loop more than the rest of its body handling, under a burst)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class BodyTimeout(Exception):
    """The client sent nothing of its body for the allowed time."""


class BodyWatch:
    """Cancels the reads that have waited longer than `timeout_s` (at most half as long again: the
    shared timer ticks every half timeout, and a read is cancelled at the second tick after it began)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        # Reads begun since the last tick, and those begun before it.
        self._new: set[asyncio.Task[object]] = set()
        self._old: set[asyncio.Task[object]] = set()
        self._expired: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def read(self, receiving: Awaitable[T]) -> T:
        """`receiving`'s result; BodyTimeout when it takes too long."""
        task = asyncio.current_task()
        assert task is not None
        self._new.add(task)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout_s / 2, self._tick)
        try:
            return await receiving
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            self._expired.discard(task)
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+: the cancel is ours, consumed
            if uncancel is not None:
                uncancel()
            raise BodyTimeout from None
        finally:
            self._new.discard(task)
            self._old.discard(task)

    def _tick(self) -> None:
        for task in self._old:
            self._expired.add(task)
            task.cancel()
        self._old, self._new = self._new, set()
        waiting = bool(self._old)
        self._timer = (
            asyncio.get_running_loop().call_later(self.timeout_s / 2, self._tick) if waiting else None
        )
