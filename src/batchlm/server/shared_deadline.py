"""One timer for many deadlines of the same length (body reads, request headers): a timer per item
costs the event loop more than the work it guards, under a burst."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class SharedDeadline(Generic[T]):
    """Calls `expire(item)` for each item still watched `timeout_s` after its watch began (at most half
    as long again: the timer ticks every half timeout, and an item expires at the third tick after it
    was watched; the first may come at once, so the second would leave it only half its time)."""

    def __init__(self, timeout_s: float, expire: Callable[[T], None]) -> None:
        self.timeout_s = timeout_s
        self._expire = expire
        # Items watched since the last tick, those that have seen one tick, and those that have seen two.
        self._new: set[T] = set()
        self._half: set[T] = set()
        self._old: set[T] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, item: T) -> None:
        """Start `item`'s wait, unless it is already waiting (its deadline stays)."""
        if item in self._old or item in self._half or item in self._new:
            return
        self._new.add(item)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout_s / 2, self._tick)

    def forget(self, item: T) -> None:
        self._new.discard(item)
        self._half.discard(item)
        self._old.discard(item)

    def _tick(self) -> None:
        expired, self._old, self._half, self._new = self._old, self._half, self._new, set()
        for item in expired:
            self._expire(item)  # may watch it again, from now
        waiting = bool(self._old or self._half or self._new)
        self._timer = (
            asyncio.get_running_loop().call_later(self.timeout_s / 2, self._tick) if waiting else None
        )
