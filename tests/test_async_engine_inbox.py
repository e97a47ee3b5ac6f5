"""The front end's inbox, through AsyncLLMEngine: messages from the engine core are handled in order on
the event loop, and consecutive step outputs that piled up while the loop was busy form one batch."""

from __future__ import annotations

from typing import Any

from batchlm.config import EngineConfig
from batchlm.core.facts import EngineStats
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.engine.front_end import StepResult
from batchlm.engine.output_collector import RequestOutputCollector
from batchlm.executor.core_messages import CoreFailed, RequestRejected
from batchlm.outputs import CoreOutputs, EngineCoreOutput, FinishReason


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


def step(tokens: dict[str, int], waiting: int) -> StepResult:
    outputs = [EngineCoreOutput(rid, (token,)) for rid, token in tokens.items()]
    return StepResult(outputs, EngineStats(num_running=len(tokens), num_waiting=waiting))


def test_consecutive_step_outputs_become_one_batch_in_step_order() -> None:
    engine = RecordingEngine()
    engine._inbox.extend([step({"a": 1, "b": 2}, 3), step({"a": 3}, 2), step({"b": 4}, 1)])
    engine._inbox_drain_pending = True
    engine._drain_inbox()
    assert engine.events == [("outputs", [("a", (1,)), ("b", (2,)), ("a", (3,)), ("b", (4,))])]
    # The newest stats win; the inbox is empty and the next message schedules a new drain.
    assert engine._engine_stats.num_waiting == 1
    assert not engine._inbox and not engine._inbox_drain_pending


def test_other_messages_keep_their_place_between_output_batches() -> None:
    engine = RecordingEngine()
    engine._inbox.extend(
        [
            step({"a": 1}, 0),
            RequestRejected("b", "prompt too long"),
            step({"a": 2}, 0),
            StepResult([EngineCoreOutput("a", (), finish_reason=FinishReason.ABORT)], EngineStats()),
            CoreFailed("core exited"),
        ]
    )
    engine._drain_inbox()
    assert engine.events == [
        ("outputs", [("a", (1,))]),
        ("rejected", "b"),
        ("outputs", [("a", (2,)), ("a", ())]),
        ("dead", "core exited"),
    ]


def test_an_empty_inbox_drains_to_nothing() -> None:
    engine = RecordingEngine()
    engine._drain_inbox()
    assert engine.events == []


def test_with_many_open_streams_drains_are_spaced_and_batch_the_steps_between() -> None:
    import asyncio

    from batchlm.engine import front_end

    async def scenario() -> tuple[list[tuple[str, Any]], float, float]:
        engine = RecordingEngine()
        engine._loop = asyncio.get_running_loop()
        for index in range(100):  # open streams: a 5 ms interval at 50 us per stream
            engine._collectors[f"r{index}"] = RequestOutputCollector()
        interval = 100 * front_end.DRAIN_INTERVAL_PER_STREAM_S
        engine._post_threadsafe(step({"a": 1}, 0))
        await asyncio.sleep(0.001)  # the first drain runs at once
        first = list(engine.events)
        first_drain_at = engine._last_drain
        engine._post_threadsafe(step({"a": 2}, 0))
        engine._post_threadsafe(step({"a": 3}, 0))
        while len(engine.events) < 2:
            await asyncio.sleep(0.0005)
        return first + engine.events[len(first) :], engine._last_drain - first_drain_at, interval

    events, spacing, interval = asyncio.run(scenario())
    assert events == [("outputs", [("a", (1,))]), ("outputs", [("a", (2,)), ("a", (3,))])]
    assert spacing >= interval


def test_the_reader_thread_unpacks_step_outputs_and_refuses_a_second_ready() -> None:
    from batchlm.core.facts import ModelFacts
    from batchlm.engine.async_engine import _for_front_end
    from batchlm.executor.core_messages import CoreReady, StepOutputs

    outputs = [
        EngineCoreOutput("a", (5,)),
        EngineCoreOutput("b", (6,), finish_reason=FinishReason.LENGTH),
    ]
    stats = EngineStats(num_running=2)
    assert _for_front_end(StepOutputs(CoreOutputs.of(outputs), stats)) == StepResult(outputs, stats)
    rejected = RequestRejected("c", "prompt too long")
    assert _for_front_end(rejected) is rejected
    assert _for_front_end(CoreFailed("gone")) == CoreFailed("gone")
    assert _for_front_end(CoreReady(ModelFacts(64, 100))) == CoreFailed(
        "the engine core reported ready twice"
    )
