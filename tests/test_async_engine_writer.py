"""The front end's writer thread: the event loop never blocks on a full pipe to the engine core, and
messages reach the core in order, consecutive request batches merged."""

from __future__ import annotations

import threading

from batchlm.config import EngineConfig
from batchlm.engine.async_engine import AsyncLLMEngine, _merge_adds
from batchlm.executor.core_messages import AbortRequests, AddRequests, Shutdown, ToCore


class BlockingConnection:
    """A pipe end whose sends wait until `release` is set, as a full pipe does."""

    def __init__(self, fail: bool = False) -> None:
        self.release = threading.Event()
        self.sending = threading.Event()  # a send has begun
        self.sent: list[ToCore] = []
        self.fail = fail

    def send(self, message: ToCore) -> None:
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
    messages: list[ToCore] = [
        AddRequests(("a",)),  # type: ignore[arg-type]
        AddRequests(("b", "c")),  # type: ignore[arg-type]
        AbortRequests(("x",)),
        AddRequests(("d",)),  # type: ignore[arg-type]
        Shutdown(),
    ]
    assert _merge_adds(messages) == [
        AddRequests(("a", "b", "c")),  # type: ignore[arg-type]
        AbortRequests(("x",)),
        AddRequests(("d",)),  # type: ignore[arg-type]
        Shutdown(),
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
    assert engine._to_core(Shutdown())
    # Each call above returned with the pipe still full: none of them waited for it.
    assert connection.sent == []
    connection.release.set()
    assert engine._writer is not None
    engine._writer.join(30)
    assert not engine._writer.is_alive()  # Shutdown ends it
    assert connection.sent == [
        AddRequests(("r0",)),  # type: ignore[arg-type]
        AddRequests(("r1", "r2")),  # type: ignore[arg-type]
        AbortRequests(("r1",)),
        Shutdown(),
    ]


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
