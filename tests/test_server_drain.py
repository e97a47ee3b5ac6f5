"""While a graceful shutdown drains in-flight streams, the listener stays open and new requests get a
503 in OpenAI's shape (not a refused connection); once the streams are done the listener closes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchlm.server.background import BackgroundServer
from fake_engine import FakeEngine, free_port, wait_until

USER = [{"role": "user", "content": "hi"}]
# Long enough to outlast the checks made while it drains (a few requests) on a loaded machine.
STREAM = {"messages": USER, "max_tokens": 300, "ignore_eos": True, "stream": True}


def data_lines(lines: Any, count: int | None = None) -> list[str]:
    """SSE payloads: `count` of them, or all that are left."""
    found = []
    for line in lines:
        if line.startswith("data: "):
            found.append(line.removeprefix("data: "))
            if count is not None and len(found) >= count:
                break
    return found


def assert_refused_while_draining(base_url: str) -> None:
    for path, body in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "hi"})):
        response = httpx.post(f"{base_url}{path}", json=body, timeout=30)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
    health = httpx.get(f"{base_url}/health", timeout=30)
    assert health.status_code == 503 and health.json() == {"status": "shutting_down"}


def test_new_requests_get_503_while_streams_drain_then_the_listener_closes() -> None:
    engine = FakeEngine(max_model_len=20_000, token_delay_s=0.5)  # sped up once the checks are done
    server = BackgroundServer(engine).start()
    url = f"{server.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=STREAM, timeout=60) as response:
        lines = response.iter_lines()
        data_lines(lines, count=2)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        wait_until(lambda: server.state.shutting_down, what="the drain to begin")
        assert_refused_while_draining(server.base_url)
        engine.token_delay_s = 0.0
        rest = data_lines(lines)
    stopper.join(60)
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
    assert engine.aborted == [] and server.exit_code == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/health")


@contextlib.contextmanager
def fake_server_process(token_delay_s: float, *extra: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A fake-engine server in a process of its own (for signals), once it is ready, and its base URL;
    killed on the way out if the test left it running."""
    port = free_port()
    script = Path(__file__).with_name("fake_engine.py")
    process = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), "--token-delay", str(token_delay_s), *extra],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(base), timeout_s=120, what="the server process to be ready")
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_drain_answers_new_requests_with_503() -> None:
    # Slow (150 s for the stream) until the checks are done, then sped up (SIGUSR1): a paced stream
    # short enough to keep the test quick would end, and the server with it, before the checks on a
    # loaded machine (they took 3 of its 6 s at a load of 17 on 2 cores).
    with fake_server_process(0.5) as (process, base):
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=STREAM, timeout=60) as response:
            lines = response.iter_lines()
            data_lines(lines, count=2)
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: not _healthy(base), what="the drain to begin")
            assert_refused_while_draining(base)
            process.send_signal(signal.SIGUSR1)
            rest = data_lines(lines)
        assert rest[-1] == "[DONE]"
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output


def test_a_second_sigint_ends_the_drain_with_abort_errors_and_no_traceback() -> None:
    # The stream must still be running when the second signal comes: 300 tokens 0.5 s apart outlast
    # the 30 s drain period, past which the drain would end it anyway (0.05 s apart, it ended at 15 s).
    with fake_server_process(0.5) as (process, base):
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=STREAM, timeout=60) as response:
            lines = response.iter_lines()
            data_lines(lines, count=2)
            process.send_signal(signal.SIGINT)
            wait_until(lambda: not _healthy(base), what="the drain to begin")
            process.send_signal(signal.SIGINT)
            rest = data_lines(lines)
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["error"]["code"] == "aborted"
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert "Traceback" not in output, output
        # The drain said when it began, and the forced end what it cut short.
        assert "shutting down: 1 request(s) in flight get up to 30.0 s to finish" in output, output
        assert "aborted 1 request(s) still running: a second signal forced the exit" in output, output


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=30).status_code == 200
    except httpx.TransportError:
        return False
