"""The server's runtime: uvicorn on the httptools parser and the uvloop event loop, both dependencies
because a streamed token costs the front end less CPU on them (BENCHMARKS.md, front-end capacity)."""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import sys

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from batchlm.server.app import build_app
from batchlm.server.launcher import GracefulServer, run_event_loop, serve
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine


def test_uvicorn_parses_http_with_httptools() -> None:
    config = GracefulServer(build_app(FakeEngine(), ServerSettings())).config
    config.load()
    assert issubclass(config.http_protocol_class, HttpToolsProtocol)


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not build on Windows")
def test_the_server_loop_is_uvloop() -> None:
    import uvloop

    async def running_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    assert isinstance(run_event_loop(running_loop()), uvloop.Loop)


class _RecordingServer(GracefulServer):
    """Serves nothing: notes the GC's frozen object count once the start-up has had its turns."""

    frozen_at_serve = -1

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        for _ in range(50):  # let the engine start (a task beside serving) run to its end
            await asyncio.sleep(0)
        self.frozen_at_serve = gc.get_freeze_count()


def test_start_up_objects_are_frozen_once_the_engine_is_up() -> None:
    # A full collection while serving must not walk the start-up objects (API servers beside the
    # primary freeze theirs before they report serving: tests/test_api_servers_live.py).
    engine = FakeEngine()
    server = _RecordingServer(build_app(engine, ServerSettings()))

    async def start_engine() -> None:
        return None

    gc.unfreeze()
    try:
        assert run_event_loop(serve(server, engine, start_engine=start_engine)) == 0
        assert server.frozen_at_serve > 0
    finally:
        gc.unfreeze()


def test_a_second_signal_forces_the_exit_and_says_so_once() -> None:
    # The primary of --api-servers N passes the force on to the other processes (ApiServerPool.force_stop).
    forced: list[bool] = []
    server = GracefulServer(
        build_app(FakeEngine(), ServerSettings()), on_force_exit=lambda: forced.append(True)
    )
    server.handle_exit(signal.SIGTERM, None)
    assert (server.should_exit, server.force_exit, forced) == (True, False, [])
    server.handle_exit(signal.SIGINT, None)
    assert (server.force_exit, forced) == (True, [True])
    server.handle_exit(signal.SIGINT, None)
    assert forced == [True]


def test_force_stops_at_once_as_a_second_signal_does() -> None:
    server = GracefulServer(build_app(FakeEngine(), ServerSettings()))
    server.force()
    assert (server.should_exit, server.force_exit) == (True, True)


@pytest.mark.parametrize(
    ("first", "second", "forced"),
    [
        # Sent together, SIGTERM then SIGINT is handled as SIGINT then SIGTERM: either forces.
        ("SIGINT", "SIGTERM", True),
        ("SIGTERM", "SIGINT", True),
        ("SIGINT", "SIGINT", True),
        # Without a SIGINT the drain goes on (a supervisor repeating its SIGTERM, a terminal closed after).
        ("SIGTERM", "SIGTERM", False),
        ("SIGTERM", "SIGHUP", False),
        ("SIGHUP", "SIGTERM", False),
    ],
)
def test_a_second_signal_forces_the_exit_when_either_is_a_sigint(
    first: str, second: str, forced: bool
) -> None:
    if not all(hasattr(signal, name) for name in (first, second)):
        pytest.skip("no such signal here")
    server = GracefulServer(build_app(FakeEngine(), ServerSettings()))
    server.handle_exit(getattr(signal, first), None)
    assert (server.should_exit, server.force_exit) == (True, False)
    server.handle_exit(getattr(signal, second), None)
    assert server.force_exit is forced
