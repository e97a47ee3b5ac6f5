"""Loading, engine death, client disconnects, and graceful shutdown (in a thread and by real signals)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchlm.engine.client import EngineDeadError
from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine, free_port, metric_value, wait_until

USER = [{"role": "user", "content": "hi"}]
# Generates until stopped (with a FakeEngine from long_engine()).
ENDLESS = {"messages": USER, "max_tokens": 10_000, "ignore_eos": True}


def long_engine(**options: Any) -> FakeEngine:
    return FakeEngine(max_model_len=20_000, **options)


def read_events(lines: Iterator[str], until_content: int | None = None) -> list[str]:
    """SSE data payloads from `response.iter_lines()`; with until_content, stop after that many content
    chunks (the same iterator then continues from there)."""
    events: list[str] = []
    contents = 0
    for line in lines:
        if not line.startswith("data: "):
            continue
        events.append(line.removeprefix("data: "))
        contents += '"content":"' in line and '"role"' not in line
        if until_content is not None and contents >= until_content:
            break
    return events


def outcome(server: BackgroundServer, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    return metric_value(text, "batchlm_requests_total", f'outcome="{name}"') or 0.0


def test_health_is_503_while_loading_then_200() -> None:
    engine = FakeEngine(ready=False)
    engine.load_gate = threading.Event()
    with BackgroundServer(engine, start_engine=engine.start) as server:
        loading = httpx.get(f"{server.base_url}/health")
        assert (loading.status_code, loading.json()) == (503, {"status": "loading"})
        engine.load_gate.set()
        server.wait_until_ready()
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        assert httpx.get(f"{server.base_url}/metrics").text.count("batchlm_engine_ready 1.0") == 1


def test_engine_that_fails_to_start_stops_the_server_with_status_1() -> None:
    engine = FakeEngine(ready=False)
    engine.start_error = RuntimeError("no such model")
    server = BackgroundServer(engine, start_engine=engine.start).start()
    with pytest.raises(RuntimeError, match="did not start"):
        server.wait_until_ready()
    assert server.stop() == 1
    assert engine.shut_down


@pytest.mark.parametrize(
    ("error", "logged"),
    [
        (RuntimeError("no such model"), "the engine failed to start: no such model"),
        (
            EngineDeadError("the engine failed to start: ValueError: --cpu-kv-cache-gib 9 is too much"),
            "the engine failed to start: ValueError: --cpu-kv-cache-gib 9 is too much",
        ),
    ],
)
def test_a_start_failure_is_logged_once_with_its_reason(
    error: Exception, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = FakeEngine(ready=False)
    engine.start_error = error
    with caplog.at_level(logging.ERROR, logger="batchlm.server.launcher"):
        server = BackgroundServer(engine, start_engine=engine.start).start()
        with pytest.raises(RuntimeError, match="did not start"):
            server.wait_until_ready()
        assert server.stop() == 1
    assert [record.getMessage() for record in caplog.records if record.name == "batchlm.server.launcher"] == [
        logged
    ]


def test_engine_death_ends_streams_with_an_error_event_and_fails_health() -> None:
    engine = long_engine(token_delay_s=0.01)
    with BackgroundServer(engine) as server:
        url = f"{server.base_url}/v1/chat/completions"
        with httpx.stream("POST", url, json={**ENDLESS, "stream": True}, timeout=30) as response:
            lines = response.iter_lines()
            read_events(lines, until_content=2)
            engine.kill()
            rest = read_events(lines)
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert error["type"] == "service_unavailable"
        assert "died" in error["message"]
        health = httpx.get(f"{server.base_url}/health")
        assert (health.status_code, health.json()) == (503, {"status": "dead"})
        assert outcome(server, "error_503") == 1


def test_an_unexpected_failure_mid_stream_ends_it_with_a_generic_500_event() -> None:
    engine = long_engine(token_delay_s=0.01)
    with BackgroundServer(engine) as server:
        url = f"{server.base_url}/v1/chat/completions"
        with httpx.stream("POST", url, json={**ENDLESS, "stream": True}, timeout=30) as response:
            lines = response.iter_lines()
            read_events(lines, until_content=2)
            engine.unexpected_error = RuntimeError("secret internals")
            rest = read_events(lines)
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert error["type"] == "server_error" and "secret" not in error["message"]
        assert outcome(server, "error_500") == 1
        assert outcome(server, "client_disconnect") == 0
        engine.unexpected_error = None
        assert httpx.post(url, json={"messages": USER, "max_tokens": 2}).status_code == 200


def test_engine_death_fails_a_non_streaming_request_with_503() -> None:
    engine = long_engine(token_delay_s=0.01)
    with BackgroundServer(engine) as server:
        result: dict[str, Any] = {}

        def call() -> None:
            result["response"] = httpx.post(
                f"{server.base_url}/v1/chat/completions", json=ENDLESS, timeout=30
            )

        worker = threading.Thread(target=call)
        worker.start()
        wait_until(lambda: engine.running == 1, what="the request to run")
        engine.kill()
        worker.join(30)
        assert result["response"].status_code == 503
        assert result["response"].json()["error"]["type"] == "service_unavailable"


def test_stream_disconnect_aborts_the_request() -> None:
    engine = long_engine(token_delay_s=0.01)
    with BackgroundServer(engine) as server:
        url = f"{server.base_url}/v1/chat/completions"
        with httpx.stream("POST", url, json={**ENDLESS, "stream": True}, timeout=30) as response:
            first = read_events(response.iter_lines(), until_content=2)
        request_id = json.loads(first[0])["id"]
        wait_until(lambda: request_id in engine.aborted, what="abort")
        wait_until(lambda: engine.running == 0, what="the engine stream to close")
        assert outcome(server, "client_disconnect") == 1
        assert len(server.state.in_flight) == 0


def raw_request(port: int, body: dict[str, Any]) -> socket.socket:
    """Send a request on a raw socket (closing it is a true disconnect, with no client-side draining)."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_before_the_first_token_aborts(stream: bool) -> None:
    engine = long_engine(first_token_delay_s=60.0)
    with BackgroundServer(engine) as server:
        sock = raw_request(server.port, {**ENDLESS, "stream": stream})
        wait_until(lambda: engine.running == 1, what="the request to reach the engine")
        sock.close()
        wait_until(lambda: len(engine.aborted) == 1, what="abort")
        wait_until(lambda: engine.running == 0, what="the engine stream to close")
        assert outcome(server, "client_disconnect") == 1


def test_disconnect_of_a_non_streaming_request_mid_generation_aborts() -> None:
    engine = long_engine(token_delay_s=0.01)
    with BackgroundServer(engine) as server:
        sock = raw_request(server.port, ENDLESS)
        wait_until(lambda: engine.running == 1, what="the request to run")
        sock.close()
        wait_until(lambda: len(engine.aborted) == 1, what="abort")
        wait_until(lambda: engine.running == 0, what="the engine stream to close")


def test_shutdown_lets_in_flight_streams_finish() -> None:
    engine = long_engine(token_delay_s=0.01)
    server = BackgroundServer(engine).start()
    url = f"{server.base_url}/v1/chat/completions"
    body = {"messages": USER, "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=30) as response:
        lines = response.iter_lines()
        read_events(lines, until_content=1)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        wait_until(lambda: server.state.shutting_down, what="shutdown to begin")
        rest = read_events(lines)
    stopper.join(30)
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
    assert server.exit_code == 0
    assert engine.shut_down
    assert engine.aborted == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/health")


@pytest.mark.parametrize("abort_raises_cancelled", [False, True])
def test_shutdown_aborts_requests_that_outlive_the_drain_period(abort_raises_cancelled: bool) -> None:
    engine = long_engine(token_delay_s=0.01, abort_raises_cancelled=abort_raises_cancelled)
    server = BackgroundServer(engine, ServerSettings(shutdown_timeout_s=0.2)).start()
    url = f"{server.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json={**ENDLESS, "stream": True}, timeout=30) as response:
        lines = response.iter_lines()
        read_events(lines, until_content=1)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        rest = read_events(lines)
    stopper.join(30)
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["error"]["code"] == "aborted"
    assert server.exit_code == 0
    assert len(engine.aborted) == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_requests_and_exits_0(signum: int) -> None:
    port = free_port()
    script = Path(__file__).with_name("fake_engine.py")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), "--token-delay", "0.01"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout_s=120, what="the server process to be ready")
        body = {"messages": USER, "max_tokens": 50, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            read_events(lines, until_content=1)
            process.send_signal(signum)
            rest = read_events(lines)
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert "Traceback" not in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_disconnect_between_the_first_token_and_the_stream_still_aborts() -> None:
    """The client leaves after the first output arrived but before the stream's first event, and the
    server's send() yields (e.g. paused writes): the response stops before its event generator ever
    runs, and the request must still be aborted and counted."""
    import asyncio

    from batchlm.server.app import build_app

    engine = long_engine(token_delay_s=0.01)
    app = build_app(engine)
    body = json.dumps({**ENDLESS, "stream": True}).encode()
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        if calls == 2:  # the disconnect watcher while the request is primed: no news
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}  # the response's own watcher: the client has gone

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(0)  # a checkpoint, where the response's cancellation lands

    async def serve() -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"",
            "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
        }  # fmt: skip
        await app(scope, receive, send)

    asyncio.run(serve())
    assert len(engine.aborted) == 1
    state = app.state.batchlm
    assert len(state.in_flight) == 0
    registry = state.metrics.registry
    assert registry.get_sample_value("batchlm_requests_total", {"outcome": "client_disconnect"}) == 1
    assert registry.get_sample_value("batchlm_requests_in_flight") == 0
