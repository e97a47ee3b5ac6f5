"""The HTTP connection layer under hostile or old clients, over raw sockets: request headers too large
(431) or too slow (the connection closed), keep-alive, HTTP/1.0 streams, requests the parser refuses,
too many connections (503).
Each gets a clear answer in OpenAI's shape, never a hang or memory held without bound."""

from __future__ import annotations

import json
import re
import select
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from batchlm.server.background import BackgroundServer
from batchlm.server.http_protocol import UVICORN_PARSER_WARNING, ParserRefusals
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine

MAX_HEADERS = 4096
# A hang guard for raw-socket reads, not a timing check.
READ_TIMEOUT_S = 60.0
# Long enough for a test's first bytes to follow its connect on a loaded machine: what is checked is
# that the deadline holds, never how long it is.
SHORT_HEADER_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    settings = ServerSettings(max_header_bytes=MAX_HEADERS)
    with BackgroundServer(FakeEngine(max_model_len=64), settings) as running:
        yield running


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S)


def read_until_closed(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def exchange(port: int, request: bytes) -> bytes:
    """Send `request` on a fresh connection; everything the server answers until it closes."""
    with connect(port) as sock:
        sock.sendall(request)
        return read_until_closed(sock)


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the one response in `answer` (its body as sent, framing included)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def json_error(answer: bytes, status: int) -> dict[str, Any]:
    """The OpenAI-shaped error of a raw answer, after checking its status and that it closes."""
    got, headers, body = parse(answer)
    assert got == status, answer[:500]
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert headers["x-request-id"], "every answer carries an X-Request-Id"
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "service_unavailable")
    return error


def test_headers_within_the_limit_are_served(server: BackgroundServer) -> None:
    padding = b"x" * (MAX_HEADERS - 200)
    answer = exchange(
        server.port,
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + padding + b"\r\nConnection: close\r\n\r\n",
    )
    assert parse(answer)[0] == 200


@pytest.mark.parametrize(
    "request_head",
    [
        # One header line far past the limit, never finished: refused while it arrives.
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * (10 * 1024 * 1024),
        # Many small headers, the whole block sent.
        b"GET /health HTTP/1.1\r\nHost: localhost\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(2000))
        + b"\r\n",
        # A block just past the limit, in one piece.
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * MAX_HEADERS + b"\r\n\r\n",
        # A request target past the limit.
        b"GET /health?" + b"q" * (2 * MAX_HEADERS) + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
        # A POST with its body: the headers are what is refused.
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nX-Pad: "
        + b"a" * MAX_HEADERS
        + b"\r\n\r\n{}",
    ],
    ids=["endless-line", "many-headers", "just-past", "long-target", "post"],
)
def test_headers_past_the_limit_are_431_in_json(server: BackgroundServer, request_head: bytes) -> None:
    error = json_error(exchange(server.port, request_head), 431)
    assert f"larger than the limit of {MAX_HEADERS} bytes" in error["message"]


def test_a_431_echoes_the_request_s_tracing_id_but_not_an_oversized_one(server: BackgroundServer) -> None:
    # The oversized header may be the id itself: echoed, the answer would be past the client's own
    # limit on a header, and the 431 never read.
    huge = (
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: " + b"r" * (4 * MAX_HEADERS) + b"\r\n\r\n"
    )
    answer = exchange(server.port, huge)
    json_error(answer, 431)
    assert re.fullmatch("req_[0-9a-f]{32}", parse(answer)[1]["x-request-id"])
    padded = (
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: trace-1\r\nX-Pad: " + b"a" * MAX_HEADERS
    )
    answer = exchange(server.port, padded + b"\r\n\r\n")
    json_error(answer, 431)
    assert parse(answer)[1]["x-request-id"] == "trace-1"
    # Refused while its headers still arrive: the id sent before the oversized header is echoed too.
    endless = b"GET /health HTTP/1.1\r\nX-Request-Id: trace-2\r\nX-Big: " + b"a" * (100 * MAX_HEADERS)
    answer = exchange(server.port, endless)
    json_error(answer, 431)
    assert parse(answer)[1]["x-request-id"] == "trace-2"


def test_a_target_past_the_url_parser_s_limit_is_414_saying_so() -> None:
    # httptools' URL parser takes 65535 bytes at most, whatever max_header_bytes allows: its refusal
    # was a 400 that said only "User callback error". (The headers' limit is set above the target,
    # so that it cannot answer first however the bytes arrive.)
    settings = ServerSettings(max_header_bytes=1024 * 1024)
    with BackgroundServer(FakeEngine(max_model_len=64), settings) as roomy:
        answer = exchange(roomy.port, b"GET /health?" + b"q" * 70_000 + b" HTTP/1.1\r\n\r\n")
    error = json_error(answer, 414)
    assert "url is too long" in error["message"] and "65535" in error["message"]


def refusals_counted(port: int, status: int) -> float:
    answer = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert parse(answer)[0] == 200
    found = re.search(rb'batchlm_requests_total\{outcome="error_%d"\} (\S+)' % status, answer)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * (4 * MAX_HEADERS) + b"\r\n\r\n", 431),
        (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * (100 * MAX_HEADERS), 431),
        (b"FOO / HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_a_refusal_is_counted_and_the_server_serves_on(
    server: BackgroundServer, request_bytes: bytes, status: int
) -> None:
    before = refusals_counted(server.port, status)
    json_error(exchange(server.port, request_bytes), status)
    assert refusals_counted(server.port, status) == before + 1


@pytest.mark.parametrize(
    ("request_bytes", "detail"),
    [
        (b"FOO /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n", "Invalid method"),
        (
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n",
            "Content-Length",
        ),
        (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"GET /v1/models HTTP/9.9\r\nHost: localhost\r\n\r\n", ""),
    ],
)
def test_a_request_the_parser_refuses_is_400_in_json(
    server: BackgroundServer, request_bytes: bytes, detail: str
) -> None:
    error = json_error(exchange(server.port, request_bytes), 400)
    assert error["message"].startswith("Invalid HTTP request") and detail in error["message"]


def test_an_unknown_method_the_parser_knows_reaches_the_app_as_405(server: BackgroundServer) -> None:
    answer = exchange(
        server.port, b"PROPFIND /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    status, _, body = parse(answer)
    assert status == 405 and json.loads(body)["error"]["message"]


def test_a_connection_that_sends_nothing_is_closed() -> None:
    settings = ServerSettings(header_timeout_s=0.05)
    with BackgroundServer(FakeEngine(), settings) as running, connect(running.port) as sock:
        assert read_until_closed(sock) == b""


@pytest.mark.parametrize("start", [b"POST /v1/completions HTTP/1.1\r\nContent-Le", b"G", b"\r\n"])
def test_headers_that_stop_arriving_close_the_connection(start: bytes) -> None:
    with BackgroundServer(FakeEngine(), ServerSettings(header_timeout_s=0.05)) as running:
        assert closed_by_server(running.port, start)


def closed_by_server(port: int, sent: bytes) -> bool:
    """Whether the server closes a connection that sent `sent` without answering anything (a reset,
    for bytes it left unread, is a close too)."""
    with connect(port) as sock:
        try:
            sock.sendall(sent)
            return sock.recv(65536) == b""
        except ConnectionResetError:
            return True


def test_headers_dripped_a_byte_at_a_time_still_meet_the_deadline() -> None:
    """Each byte arriving does not restart the deadline (slowloris)."""
    endless = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100_000
    settings = ServerSettings(header_timeout_s=0.05)
    with BackgroundServer(FakeEngine(), settings) as running, connect(running.port) as sock:
        try:
            for byte in endless:
                readable, _, _ = select.select([sock], [], [], 0.01)
                if readable:
                    break
                sock.sendall(bytes([byte]))
            else:
                pytest.fail("the server let the headers drip for 100,000 bytes")
            assert sock.recv(65536) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed under bytes it left unread


def test_an_idle_keep_alive_connection_closes_after_the_keep_alive_timeout() -> None:
    # The header deadline is far off: what closes the connection is the keep-alive timeout.
    settings = ServerSettings(keep_alive_timeout_s=0.05, header_timeout_s=600.0)
    with BackgroundServer(FakeEngine(), settings) as running, connect(running.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, headers, body = parse(read_until_closed(sock))
    assert status == 200 and "connection" not in headers and json.loads(body) == {"status": "ok"}


def test_blank_lines_on_an_idle_connection_do_not_keep_it_open() -> None:
    """Bytes that begin no request stop uvicorn's keep-alive timer; the header deadline then closes
    the connection."""
    settings = ServerSettings(keep_alive_timeout_s=600.0, header_timeout_s=SHORT_HEADER_TIMEOUT_S)
    with BackgroundServer(FakeEngine(), settings) as running, connect(running.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        while b'{"status":"ok"}' not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        sock.sendall(b"\r\n")
        assert read_until_closed(sock) == b""


def test_keep_alive_serves_several_requests_on_one_connection(server: BackgroundServer) -> None:
    with connect(server.port) as sock:
        for _ in range(3):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = b""
            while b'{"status":"ok"}' not in answer:
                answer += sock.recv(65536)
            assert parse(answer)[0] == 200


def completions_request(version: bytes, body: dict[str, Any], method: bytes = b"POST") -> bytes:
    content = json.dumps(body).encode()
    return (
        method
        + b" /v1/completions HTTP/"
        + version
        + b"\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(content) + content
    )


def test_a_stream_to_an_http_1_0_client_ends_with_the_connection(server: BackgroundServer) -> None:
    request = completions_request(b"1.0", {"prompt": "hi", "max_tokens": 3, "stream": True})
    status, headers, body = parse(exchange(server.port, request))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert "transfer-encoding" not in headers and "content-length" not in headers
    assert headers["connection"] == "close"
    events = [line for line in body.decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and len(events) == 4
    assert all(
        json.loads(event.removeprefix("data: "))["object"] == "text_completion" for event in events[:-1]
    )


def test_a_json_answer_to_an_http_1_0_client_keeps_its_content_length(server: BackgroundServer) -> None:
    request = completions_request(b"1.0", {"prompt": "hi", "max_tokens": 3})
    status, headers, body = parse(exchange(server.port, request))
    assert status == 200 and int(headers["content-length"]) == len(body)
    assert json.loads(body)["choices"][0]["text"]


def test_a_stream_to_an_http_1_1_client_is_still_chunked(server: BackgroundServer) -> None:
    request = completions_request(b"1.1", {"prompt": "hi", "max_tokens": 3, "stream": True})
    request = request.replace(b"Host: localhost\r\n", b"Host: localhost\r\nConnection: close\r\n")
    status, headers, body = parse(exchange(server.port, request))
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


def test_connections_past_the_cap_are_503_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    settings = ServerSettings(max_connections=2, header_timeout_s=600.0)
    with BackgroundServer(FakeEngine(), settings) as running, connect(running.port) as first:
        with connect(running.port) as second:
            # Both held: the server has answered a request on each.
            for held in (first, second):
                held.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                answer = b""
                while b'{"status":"ok"}' not in answer:
                    answer += held.recv(65536)
            # Answered at once, before its request (which would find the connection closed).
            with caplog.at_level("WARNING", logger="batchlm.server.http_protocol"):
                with connect(running.port) as third:
                    refused = read_until_closed(third)
                with connect(running.port) as fourth:
                    read_until_closed(fourth)
        error = json_error(refused, 503)
        assert error["code"] == "too_many_connections" and error["type"] == "service_unavailable"
        assert parse(refused)[1]["retry-after"] == "1"
        # One warning, not one per refused connection.
        warnings = [r.getMessage() for r in caplog.records if "refused with 503" in r.getMessage()]
        assert len(warnings) == 1 and "2 are open" in warnings[0]
        # With `second` closed, new connections are served again (once the server has seen it close).
        for _ in range(10_000):
            try:
                answer = exchange(
                    running.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                )
            except ConnectionResetError:  # refused still, before its request was read
                continue
            if parse(answer)[0] == 200:
                break
        else:
            pytest.fail("no connection was served after one closed")


def test_a_refused_request_logs_one_throttled_warning_and_no_uvicorn_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING"), BackgroundServer(FakeEngine()) as running:
        for _ in range(3):
            json_error(exchange(running.port, b"FOO / HTTP/1.1\r\nHost: localhost\r\n\r\n"), 400)
    assert not [r for r in caplog.records if r.getMessage() == UVICORN_PARSER_WARNING]
    # One line for the three (the next after a minute), naming the reason.
    ours = [r.getMessage() for r in caplog.records if r.name == "batchlm.server.http_protocol"]
    assert len(ours) == 1 and "refused with 400" in ours[0] and "Invalid method" in ours[0]


def test_parser_refusals_warn_once_an_interval_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    refusals = ParserRefusals(interval_s=60.0, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="batchlm.server.http_protocol"):
        refusals.refused("Invalid method encountered", "10.0.0.1:5000")
        refusals.refused("Invalid method encountered", "10.0.0.1:5001")
        now[0] = 60.0
        refusals.refused("Invalid header value char", "10.0.0.2:6000")
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2
    assert logged[0].startswith("1 request(s)") and "10.0.0.1:5000" in logged[0]
    assert logged[1].startswith("2 request(s)") and "10.0.0.2:6000: Invalid header value" in logged[1]


def test_uvicorn_warnings_other_than_the_parser_one_still_reach_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING"), BackgroundServer(FakeEngine()) as running:
        request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n"
        with connect(running.port) as sock:
            sock.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                assert chunk
                answer += chunk
    assert [r for r in caplog.records if r.getMessage() == "Unsupported upgrade request."]


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_over_the_limit_gets_its_413_while_the_client_still_sends_it(declared: bool) -> None:
    """The app answers 413 before the body has arrived (at once for a Content-Length past the limit):
    closed then, the connection would be reset under the client still writing its body, which then
    never reads the 413 (an SDK would report a connection error and retry the same body). The rest of
    the body is read and dropped instead, so the client finishes sending, then reads the answer."""
    limit = 1024
    # Far more than the kernel's socket buffers hold: a reset would stop the sending.
    body = b"x" * (16 * 1024 * 1024)
    framing = b"content-length: %d\r\n" % len(body) if declared else b"transfer-encoding: chunked\r\n"
    head = (
        b"POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        + framing
        + b"\r\n"
    )
    sent = body if declared else b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with BackgroundServer(FakeEngine(), ServerSettings(max_body_bytes=limit)) as running:
        with connect(running.port) as sock:
            sock.sendall(head + sent)
            error = json_error(read_until_closed(sock), 413)
        assert str(limit) in error["message"]
