"""The engine core serving several front ends (API-server processes), one pipe each: each gets only
its own requests' outputs, a secondary leaving is detached (its requests aborted) while the primary's
pipe closing stops the core, an id in use from another front end is rejected, and a crash reaches
the front end as one line."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

import pytest

from batchlm.config import EngineConfig
from batchlm.core.facts import EngineStats, ModelFacts
from batchlm.executor.core_messages import (
    AddRequests,
    CoreFailed,
    CoreReady,
    RequestRejected,
    Shutdown,
    StepOutputs,
)
from batchlm.executor.core_process import CoreLoop
from batchlm.outputs import CoreOutputs, EngineCoreOutput, FinishReason
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams
from fake_engine import wait_until

T = TypeVar("T")


class CountingCore:
    """Each request emits one token per step until it has max_tokens of them, then finishes."""

    def __init__(self) -> None:
        self.remaining: dict[str, int] = {}
        self.aborted: list[str] = []
        self.executor = object()
        self.step_gate = threading.Event()
        self.step_gate.set()

    def add_request(self, request: EngineCoreRequest) -> None:
        if request.request_id in self.remaining:
            raise ValueError("duplicate")
        self.remaining[request.request_id] = request.sampling_params.max_tokens or 1

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        outputs = []
        for request_id in request_ids:
            if self.remaining.pop(request_id, None) is not None:
                self.aborted.append(request_id)
                outputs.append(EngineCoreOutput(request_id, (), finish_reason=FinishReason.ABORT))
        return outputs

    def has_work(self) -> bool:
        return bool(self.remaining)

    def step(self) -> CoreOutputs:
        outputs = CoreOutputs()
        if not self.step_gate.wait(0.01):
            return outputs  # held: no progress, while the loop goes on taking messages between steps
        for request_id in list(self.remaining):
            self.remaining[request_id] -= 1
            done = self.remaining[request_id] == 0
            if done:
                del self.remaining[request_id]
            outputs.append(
                EngineCoreOutput(request_id, (1,), finish_reason=FinishReason.LENGTH if done else None)
            )
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.remaining))


def core_request(request_id: str, max_tokens: int = 3) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, (1, 2), SamplingParams(max_tokens=max_tokens), (0,), time.time())


class Wire:
    """A CoreLoop on its own thread with `count` front-end pipes."""

    def __init__(self, count: int) -> None:
        pipes = [Pipe() for _ in range(count)]
        self.front = [front for front, _ in pipes]
        self.core = CountingCore()
        self.loop = CoreLoop(self.core, [core_end for _, core_end in pipes])  # type: ignore[arg-type]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as error:
            self.error = error

    def discard_messages_to(self, client: int) -> None:
        """Read and drop what the core sends this front end (a full pipe would block the core)."""

        def drain() -> None:
            try:
                while True:
                    self.front[client].recv()
            except (EOFError, OSError, TypeError):  # TypeError: the test closed this end meanwhile
                return

        threading.Thread(target=drain, daemon=True).start()

    def outputs_until_finished(self, client: int, request_ids: set[str]) -> list[EngineCoreOutput]:
        """Every output client `client` receives until all of request_ids have finished."""
        received: list[EngineCoreOutput] = []
        pending = set(request_ids)
        deadline = time.monotonic() + 30  # a hang guard
        while pending:
            assert self.front[client].poll(max(0.0, deadline - time.monotonic())), (
                f"still waiting for {pending}"
            )
            message = self.front[client].recv()
            if not isinstance(message, StepOutputs):
                continue
            assert isinstance(message.stats, EngineStats)
            for output in message.unpack():
                received.append(output)
                if output.finish_reason is not None:
                    pending.discard(output.request_id)
        return received


def messages_of(conn: Connection, kind: type[T], within_s: float = 5.0) -> Iterator[T]:
    deadline = time.monotonic() + within_s
    while conn.poll(max(0.0, deadline - time.monotonic())):
        message = conn.recv()
        if isinstance(message, kind):
            yield message


def test_each_front_end_gets_only_the_outputs_of_its_own_requests() -> None:
    wire = Wire(3)
    wire.core.step_gate.clear()  # all three adds land before the first step
    wire.front[0].send(AddRequests((core_request("a0"), core_request("a1", max_tokens=2))))
    wire.front[2].send(AddRequests((core_request("c0", max_tokens=4),)))
    wait_until(lambda: set(wire.core.remaining) == {"a0", "a1", "c0"}, timeout_s=30, what="the three adds")
    wire.core.step_gate.set()
    first = wire.outputs_until_finished(0, {"a0", "a1"})
    third = wire.outputs_until_finished(2, {"c0"})
    assert sorted(o.request_id for o in first) == ["a0"] * 3 + ["a1"] * 2
    assert [o.request_id for o in third] == ["c0"] * 4
    # The second front end added nothing: it gets stats with empty outputs, never others' tokens.
    for packed in messages_of(wire.front[1], StepOutputs, within_s=0.5):
        assert packed.unpack() == []
    wire.front[0].send(Shutdown())
    wire.thread.join(30)
    assert not wire.thread.is_alive() and wire.error is None


def test_a_secondary_front_end_leaving_aborts_its_requests_and_the_core_carries_on() -> None:
    wire = Wire(2)
    wire.core.step_gate.clear()
    wire.front[1].send(AddRequests((core_request("left-behind", max_tokens=1000),)))
    wire.front[0].send(AddRequests((core_request("kept", max_tokens=1000),)))
    wire.front[1].close()  # the API-server process exited
    wire.core.step_gate.set()
    wait_until(lambda: wire.core.aborted == ["left-behind"], timeout_s=30, what="the orphan to be aborted")
    wire.front[0].send(AddRequests((core_request("after", max_tokens=2),)))
    outputs = wire.outputs_until_finished(0, {"after"})
    assert {o.request_id for o in outputs} <= {"kept", "after"}
    assert wire.thread.is_alive()
    wire.front[0].send(Shutdown())
    wire.thread.join(30)
    assert wire.error is None


def test_shutdown_from_a_secondary_only_detaches_it_and_the_primary_closing_stops_the_core() -> None:
    wire = Wire(2)
    wire.discard_messages_to(0)
    wire.discard_messages_to(1)
    wire.front[1].send(AddRequests((core_request("orphan", max_tokens=10_000_000),)))
    wait_until(lambda: "orphan" in wire.core.remaining, timeout_s=30, what="the request to be added")
    wire.front[1].send(Shutdown())
    wait_until(lambda: wire.core.aborted == ["orphan"], timeout_s=30, what="the detach")
    assert wire.thread.is_alive()
    wire.front[0].send(AddRequests((core_request("busy", max_tokens=10_000_000),)))
    wire.front[0].close()
    wire.thread.join(30)
    assert not wire.thread.is_alive()
    # engine_core_main takes any of these as "the front end went away" and exits (a reset when the
    # closed end still held unread outputs).
    assert isinstance(wire.error, (EOFError, BrokenPipeError, ConnectionResetError))


def test_an_id_in_use_by_another_front_end_is_rejected_to_the_sender_only() -> None:
    wire = Wire(2)
    wire.core.step_gate.clear()
    wire.front[0].send(AddRequests((core_request("same", max_tokens=50),)))
    wait_until(lambda: "same" in wire.core.remaining, timeout_s=30, what="the first add")
    wire.front[1].send(AddRequests((core_request("same", max_tokens=50),)))
    rejected = next(messages_of(wire.front[1], RequestRejected, within_s=30))
    assert rejected.request_id == "same"
    wire.core.step_gate.set()
    assert {o.request_id for o in wire.outputs_until_finished(0, {"same"})} == {"same"}
    wire.front[0].send(Shutdown())
    wire.thread.join(30)


class CrashingCore(CountingCore):
    def step(self) -> CoreOutputs:
        raise RuntimeError("the device went away\nsecond line of detail")


def test_a_crash_while_serving_reaches_the_front_end_as_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The traceback stays in the core's log: the reason is what clients read in their 503s."""
    from batchlm.executor import core_builder, core_process

    monkeypatch.setattr(core_process, "prefer_passive_waiting", lambda device: None)
    monkeypatch.setattr(core_process, "configure_child_threads", lambda: None)
    monkeypatch.setattr(
        core_builder, "build_engine_core", lambda config, model_dir: (CrashingCore(), ModelFacts(64, 100))
    )
    front, core_end = Pipe()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            core_process.engine_core_main(EngineConfig(model="unused"), Path("unused"), core_end)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert front.poll(30) and isinstance(front.recv(), CoreReady)
    front.send(AddRequests((core_request("doomed"),)))
    failed = next(messages_of(front, CoreFailed, within_s=30))
    thread.join(30)
    assert failed == CoreFailed("RuntimeError: the device went away")
    assert [type(error) for error in errors] == [RuntimeError]
