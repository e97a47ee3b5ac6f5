"""tests/live_server.py's `serving` stops the server and its engine on every path, so that a failing
test leaves no server thread, port or engine process behind."""

from __future__ import annotations

import threading

import pytest

from fake_engine import FakeEngine
from live_server import serving


def test_an_engine_that_never_becomes_ready_is_shut_down() -> None:
    engine = FakeEngine(ready=False)
    engine.load_gate = threading.Event()  # never set: the engine stays loading
    with pytest.raises(TimeoutError), serving(engine, ready_s=0):
        pass
    assert engine.shut_down


def test_an_engine_that_fails_to_start_is_shut_down() -> None:
    engine = FakeEngine(ready=False)
    engine.start_error = RuntimeError("no weights")
    with pytest.raises(RuntimeError, match="did not start"), serving(engine):
        pass
    assert engine.shut_down


def test_a_test_that_raises_stops_the_server() -> None:
    engine = FakeEngine(ready=False)
    with pytest.raises(ValueError, match="the test failed"), serving(engine) as running:
        assert running.engine.is_ready
        raise ValueError("the test failed")
    assert engine.shut_down
