"""The front end's hand-off, through AsyncLLMEngine: messages from the engine core's reader thread are
handled in order on the event loop, each step's outputs as they came (a consumer that falls behind
gets them merged by its output collector, tests/test_front_end.py)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from batchlm.config import EngineConfig
from batchlm.core.scheduler import SchedulerStats
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.outputs import EngineCoreOutput, FinishReason


class RecordingEngine(AsyncLLMEngine):
    """The real inbox with the handlers replaced by recorders (no engine core is started)."""

    def __init__(self) -> None:
        super().__init__(EngineConfig(), multiprocess=False)
        self.events: list[tuple[str, Any]] = []

    def _on_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        self.events.append(("outputs", [(o.request_id, o.new_token_ids) for o in outputs]))

    def _on_rejected(self, core_id: str, message: str) -> None:
        self.events.append(("rejected", core_id))

    def _mark_dead(self, reason: str, expected: bool = False) -> None:
        self.events.append(("dead", reason))


def step(tokens: dict[str, int], waiting: int) -> tuple[str, Any]:
    outputs = [EngineCoreOutput(rid, (token,)) for rid, token in tokens.items()]
    return ("outputs", (outputs, SchedulerStats(num_running=len(tokens), num_waiting=waiting)))


def post_all(engine: RecordingEngine, messages: list[tuple[str, Any]]) -> None:
    """Post from another thread, as the reader does, and wait until the loop handled them."""

    async def scenario() -> None:
        engine._loop = asyncio.get_running_loop()
        poster = threading.Thread(target=lambda: [engine._post_threadsafe(*m) for m in messages])
        poster.start()
        await asyncio.to_thread(poster.join)
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_messages_are_handled_in_order_and_each_step_on_its_own() -> None:
    engine = RecordingEngine()
    post_all(
        engine,
        [
            step({"a": 1, "b": 2}, 3),
            ("rejected", ("b", "prompt too long")),
            step({"a": 2}, 1),
            ("outputs", ([EngineCoreOutput("a", (), finish_reason=FinishReason.ABORT)], SchedulerStats())),
            ("failed", "core exited"),
        ],
    )
    assert engine.events == [
        ("outputs", [("a", (1,)), ("b", (2,))]),
        ("rejected", "b"),
        ("outputs", [("a", (2,))]),
        ("outputs", [("a", ())]),
        ("dead", "core exited"),
    ]


def test_the_newest_stats_win() -> None:
    engine = RecordingEngine()
    post_all(engine, [step({"a": 1}, 3), step({"a": 2}, 1)])
    assert engine._core_stats.num_waiting == 1
