"""A live server on a real engine that loads in the background (the tiny random-weight model's, the
default model's), for a module's `server` fixture: `with serving(engine) as running: yield running`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings


@contextmanager
def serving(
    engine: Any, settings: ServerSettings | None = None, *, ready_s: float = 180.0
) -> Iterator[BackgroundServer]:
    """Serve `engine` (an EngineClient whose async start() loads it) once it has loaded, then stop
    the server. ready_s is a hang guard (a loaded 2-core machine is slow). The stop must be clean also
    once a test killed the engine: else the server's threads and port outlive the module. It is
    stopped on every path: an engine that fails to become ready, or a test that raises, leaves no
    server (nor engine process) behind; their error is the one raised."""
    running = BackgroundServer(engine, settings, start_engine=engine.start)
    try:
        running.start()
        running.wait_until_ready(ready_s)
        yield running
    except BaseException as error:
        try:
            running.stop()
        except Exception as stop_error:  # the first error says what went wrong; this one follows it
            error.add_note(f"and the server did not stop: {stop_error!r}")
        raise
    assert running.stop() == 0
