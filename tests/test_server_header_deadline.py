"""--header-timeout: a connection that never sends its request's headers in full is closed (a client
holding many such connections would otherwise exhaust the server's file descriptors), while a request
being served, however long, is never cut."""

from __future__ import annotations

import json
import socket

import httpx

from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine

# A hang guard for raw-socket reads, not a timing check.
READ_TIMEOUT_S = 60.0
# Short: a connection that is to be closed gets closed soon.
SHORT_DEADLINE_S = 0.2
# Where a request has to arrive in time: ample for a client on a loaded machine to send it.
AMPLE_DEADLINE_S = 2.0


def closed_unanswered(port: int, sent: bytes) -> bool:
    """Whether the server closes a connection that sent `sent` without answering anything."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        if sent:
            sock.sendall(sent)
        return sock.recv(65536) == b""


def test_a_connection_without_complete_headers_is_closed() -> None:
    with BackgroundServer(FakeEngine(), ServerSettings(header_timeout_s=SHORT_DEADLINE_S)) as server:
        assert closed_unanswered(server.port, b"")  # opened, nothing sent
        assert closed_unanswered(server.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # headers stall


def test_the_next_request_on_a_kept_alive_connection_has_the_deadline_too() -> None:
    with (
        BackgroundServer(FakeEngine(), ServerSettings(header_timeout_s=AMPLE_DEADLINE_S)) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=READ_TIMEOUT_S) as sock,
    ):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        while not answer.endswith(b'{"status":"ok"}'):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        # Part of a next request's headers (which cancels uvicorn's own keep-alive timer), then nothing.
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        assert sock.recv(65536) == b""


def test_a_response_that_outlasts_the_deadline_is_not_cut() -> None:
    # Thirty tokens 0.1 s apart: the stream outlasts the deadline, however fast the machine.
    engine = FakeEngine(reply="0123456789" * 3, token_delay_s=0.1)
    with (
        BackgroundServer(engine, ServerSettings(header_timeout_s=AMPLE_DEADLINE_S)) as server,
        httpx.Client(base_url=server.base_url, timeout=READ_TIMEOUT_S) as client,
    ):
        body = {"prompt": "hi", "max_tokens": 30, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        text = "".join(json.loads(event[6:])["choices"][0]["text"] for event in events[:-1])
        assert text == engine.reply
        # The connection that served it serves the next request at once.
        assert client.get("/health").status_code == 200
