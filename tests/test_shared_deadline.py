"""SharedDeadline (the body-read and request-header time limits): an item expires no sooner than its
timeout after it was watched, and no later than half as long again, wherever between two ticks of the
shared timer its watch began."""

from __future__ import annotations

import asyncio

import pytest

from batchlm.server.shared_deadline import SharedDeadline

TIMEOUT_S = 1.0
STEP_S = 0.05


class ClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test moves it: timers fire by this clock."""

    now = 0.0

    def time(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        """Move the clock on; the timers due by then have fired when this returns."""
        self.now = round(self.now + seconds, 6)
        # The first pass queues the due timers behind this coroutine; the second runs them.
        await asyncio.sleep(0)
        await asyncio.sleep(0)


def test_an_item_expires_between_one_and_one_and_a_half_timeouts_after_its_watch() -> None:
    loop = ClockLoop()
    watched: dict[int, float] = {}
    expired: dict[int, float] = {}

    async def scenario() -> None:
        deadline: SharedDeadline[int] = SharedDeadline(
            TIMEOUT_S, lambda item: expired.setdefault(item, loop.now)
        )
        # A new item every step for two timeouts (each phase of the timer's tick), then time runs on.
        for step in range(round(4 * TIMEOUT_S / STEP_S)):
            if step < round(2 * TIMEOUT_S / STEP_S):
                watched[step] = loop.now
                deadline.watch(step)
            await loop.advance(STEP_S)

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert expired.keys() == watched.keys()
    for item, start in watched.items():
        waited = expired[item] - start
        assert TIMEOUT_S - 1e-6 <= waited <= 1.5 * TIMEOUT_S + 1e-6, (item, start, waited)


def test_a_forgotten_item_never_expires() -> None:
    async def scenario() -> list[str]:
        expired: list[str] = []
        deadline: SharedDeadline[str] = SharedDeadline(0.02, expired.append)
        deadline.watch("kept")
        deadline.watch("done")
        deadline.forget("done")
        while not expired:
            await asyncio.sleep(0.01)
        return expired

    assert asyncio.run(scenario()) == ["kept"]


@pytest.mark.parametrize("again", [True, False])
def test_watching_an_item_again_keeps_its_first_deadline(again: bool) -> None:
    loop = ClockLoop()
    expired: list[float] = []

    async def scenario() -> None:
        deadline: SharedDeadline[str] = SharedDeadline(TIMEOUT_S, lambda _: expired.append(loop.now))
        deadline.watch("item")
        for _ in range(round(2 * TIMEOUT_S / STEP_S)):
            await loop.advance(STEP_S)
            if again and not expired:
                deadline.watch("item")

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert len(expired) == 1 and TIMEOUT_S - 1e-6 <= expired[0] <= 1.5 * TIMEOUT_S + 1e-6
