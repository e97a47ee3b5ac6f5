"""The time limit on reading a request body: one timer for every read in progress, not one per read
(SharedDeadline)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from batchlm.server.shared_deadline import SharedDeadline

T = TypeVar("T")


class BodyTimeout(Exception):
    """The client sent nothing of its body for the allowed time."""


class BodyWatch:
    """Cancels the reads that have waited longer than `timeout_s` (at most half as long again: see
    SharedDeadline)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._expired: set[asyncio.Task[object]] = set()
        self._deadline: SharedDeadline[asyncio.Task[object]] = SharedDeadline(timeout_s, self._cancel)

    async def read(self, receiving: Awaitable[T]) -> T:
        """`receiving`'s result; BodyTimeout when it takes too long."""
        task = asyncio.current_task()
        assert task is not None
        self._deadline.watch(task)
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
            self._deadline.forget(task)

    def _cancel(self, task: asyncio.Task[object]) -> None:
        self._expired.add(task)
        task.cancel()
