"""The front end's writer thread: the event loop never blocks on a full pipe to the engine core, and
messages reach the core in order, consecutive request batches merged."""

from __future__ import annotations

import threading
from typing import Any

from batchlm.config import EngineConfig
from batchlm.engine.async_engine import AsyncLLMEngine, _merge_adds


class BlockingConnection:
    """A pipe end whose sends wait until `release` is set, as a full pipe does."""

    def __init__(self, fail: bool = False) -> None:
        self.release = threading.Event()
        self.sending = threading.Event()  # a send has begun
        self.sent: list[tuple[str, Any]] = []
        self.fail = fail

    def send(self, message: tuple[str, Any]) -> None:
        self.sending.set()
        self.release.wait(60)  # a hang guard
        if self.fail:
            raise BrokenPipeError("the core is gone")
        self.sent.append(message)


def _engine_with_writer(connection: BlockingConnection) -> AsyncLLMEngine:
    engine = AsyncLLMEngine(EngineConfig(model="unused", device="cpu"))
    engine._conn = connection  # type: ignore[assignment]
    engine._writer = threading.Thread(target=engine._write_loop, daemon=True)
    engine._writer.start()
    return engine


def test_consecutive_adds_merge_and_everything_else_keeps_its_place() -> None:
    messages: list[tuple[str, Any]] = [
        ("add", ["a"]),
        ("add", ["b", "c"]),
        ("abort", ["x"]),
        ("add", ["d"]),
        ("shutdown", None),
    ]
    assert _merge_adds(messages) == [
        ("add", ["a", "b", "c"]),
        ("abort", ["x"]),
        ("add", ["d"]),
        ("shutdown", None),
    ]
    assert _merge_adds([]) == []


def test_sends_return_at_once_while_the_pipe_is_full_and_arrive_in_order() -> None:
    connection = BlockingConnection()
    engine = _engine_with_writer(connection)
    assert engine._send_requests(["r0"])  # type: ignore[list-item]
    assert connection.sending.wait(30)  # the writer takes r0 and blocks in send
    assert engine._send_requests(["r1"])  # type: ignore[list-item]
    assert engine._send_requests(["r2"])  # type: ignore[list-item]
    engine._send_abort(["r1"])
    assert engine._to_core(("shutdown", None))
    # Each call above returned with the pipe still full: none of them waited for it.
    assert connection.sent == []
    connection.release.set()
    assert engine._writer is not None
    engine._writer.join(30)
    assert not engine._writer.is_alive()  # "shutdown" ends it
    assert connection.sent == [("add", ["r0"]), ("add", ["r1", "r2"]), ("abort", ["r1"]), ("shutdown", None)]


def test_a_dead_core_stops_the_writer_without_raising_on_the_loop() -> None:
    connection = BlockingConnection(fail=True)
    connection.release.set()
    engine = _engine_with_writer(connection)
    assert engine._send_requests(["r0"])  # type: ignore[list-item]
    assert engine._writer is not None
    engine._writer.join(30)
    assert not engine._writer.is_alive()
    engine._send_abort(["r0"])  # queued for nobody: no error here; the reader reports the dead core


def test_without_a_core_nothing_is_sent() -> None:
    engine = AsyncLLMEngine(EngineConfig(model="unused", device="cpu"))
    assert not engine._send_requests(["r0"])  # type: ignore[list-item]
    engine._send_abort(["r0"])
