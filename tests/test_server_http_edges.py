"""HTTP details as clients and proxies send them: compressed bodies, bodies that are not UTF-8 or never
arrive, HEAD, trailing slashes. Each works or gets a clear error in OpenAI's shape, never a hang."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import math
import socket
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from batchlm.sampling_params import SamplingParamsError, StructuredOutputs
from batchlm.server.background import BackgroundServer
from batchlm.server.body_watch import BodyTimeout, BodyWatch
from batchlm.server.state import ServerSettings
from error_shape import error_of
from fake_engine import FakeEngine

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JSON = {"content-type": "application/json"}
MAX_BODY = 256 * 1024
# A hang guard for raw-socket reads, not a timing check.
READ_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer(FakeEngine(max_model_len=64), ServerSettings(max_body_bytes=MAX_BODY)) as running:
        yield running


def post(server: BackgroundServer, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", content=content, headers={**JSON, **headers}, timeout=30)


def exchange(port: int, request: bytes) -> bytes:
    """Send `request` on a fresh connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, as some clients send it
        ("GZIP, identity", gzip.compress),
    ],
)
@pytest.mark.parametrize(
    ("path", "body", "key"),
    [
        ("/v1/chat/completions", CHAT, "choices"),  # the fast generation path
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}, None),
        ("/tokenize", {"prompt": "hi"}, "tokens"),  # FastAPI's path
    ],
)
def test_gzip_and_deflate_bodies_are_decoded(
    server: BackgroundServer, coding: str, compress: Any, path: str, body: Any, key: str | None
) -> None:
    response = post(server, path, compress(json.dumps(body).encode()), {"content-encoding": coding})
    assert response.status_code == 200, response.text
    if key is None:
        assert response.text.endswith("data: [DONE]\n\n")
    else:
        assert response.json()[key]


def test_an_encoding_not_decoded_is_415_and_a_broken_one_400(server: BackgroundServer) -> None:
    body = json.dumps(CHAT).encode()
    error = error_of(post(server, "/v1/chat/completions", body, {"content-encoding": "br"}), 415)
    assert "'br'" in error["message"] and "gzip" in error["message"]
    assert error["code"] == "unsupported_content_encoding"
    broken = error_of(post(server, "/v1/chat/completions", b"not gzip", {"content-encoding": "gzip"}), 400)
    assert "Content-Encoding" in broken["message"]
    truncated = gzip.compress(body)[:-12]
    error_of(post(server, "/v1/chat/completions", truncated, {"content-encoding": "gzip"}), 400)


def test_a_compressed_body_counts_against_the_limit_once_decoded(server: BackgroundServer) -> None:
    bomb = gzip.compress(b" " * (MAX_BODY * 50) + json.dumps(CHAT).encode())
    assert len(bomb) < MAX_BODY
    error = error_of(post(server, "/v1/chat/completions", bomb, {"content-encoding": "gzip"}), 413)
    assert "decoded" in error["message"] and str(MAX_BODY) in error["message"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"prompt": "\xe9", "messages": [{"role": "user", "content": "\xff"}]}', "not UTF-8 text"),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nest more than 200 levels"),
        (b'{"prompt": "hi", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}", "digits"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_a_body_json_cannot_read_is_400_saying_why(
    path: str, body: bytes, reason: str, server: BackgroundServer
) -> None:
    message = error_of(post(server, path, body, {}), 400)["message"]
    assert message.startswith("The request body could not be parsed as JSON: ") and reason in message


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/version", "/v1/models/fake-model"])
def test_head_is_answered_where_get_is(server: BackgroundServer, path: str) -> None:
    got = httpx.get(f"{server.base_url}{path}")
    head = httpx.head(f"{server.base_url}{path}")
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


def test_head_of_a_post_route_is_still_405(server: BackgroundServer) -> None:
    response = httpx.head(f"{server.base_url}/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"


def test_a_trailing_slash_serves_the_route_without_a_redirect(server: BackgroundServer) -> None:
    body = json.dumps(CHAT).encode()
    response = post(server, "/v1/chat/completions/", body, {})
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"
    streamed = post(server, "/v1/completions/", b'{"prompt": "hi", "max_tokens": 2, "stream": true}', {})
    assert streamed.text.endswith("data: [DONE]\n\n")
    models = httpx.get(f"{server.base_url}/v1/models/")
    assert models.status_code == 200 and models.json()["object"] == "list"
    assert httpx.get(f"{server.base_url}/v1/models/fake-model/").json()["id"] == "fake-model"
    assert httpx.get(f"{server.base_url}/health/").status_code == 200
    head = httpx.head(f"{server.base_url}/v1/models/")
    assert head.status_code == 200 and head.headers["content-length"] == models.headers["content-length"]
    assert "/v1/nothing/" in error_of(httpx.get(f"{server.base_url}/v1/nothing/"), 404)["message"]


def test_a_refused_body_closes_the_connection(server: BackgroundServer) -> None:
    # Keep-alive would oblige the server to read (and drop) the rest of a body it refused.
    response = post(server, "/v1/completions", b"x" * (MAX_BODY + 1), {})
    error_of(response, 413)
    assert response.headers["connection"] == "close"


@pytest.mark.parametrize(
    "request_start",
    [
        b"Content-Length: 100\r\n\r\n",  # headers, then nothing
        b'Content-Length: 100\r\n\r\n{"messages"',  # part of the body, then nothing
        b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mes\r\n',
        b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n",
    ],
)
def test_a_body_that_stops_arriving_is_408_not_a_hang(request_start: bytes) -> None:
    settings = ServerSettings(body_timeout_s=0.05)
    with BackgroundServer(FakeEngine(), settings) as server:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        answer = exchange(server.port, head + request_start)
    status_line, _, rest = answer.rpartition(b"HTTP/1.1 ")[2].partition(b"\r\n")
    assert status_line == b"408 Request Timeout"
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    error = json.loads(body)["error"]
    assert "did not arrive" in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/chat/completions", CHAT, 200),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}, 200),
        ("POST", "/v1/chat/completions", {"messages": []}, 400),
        ("GET", "/v1/models", None, 200),
        ("GET", "/nothing", None, 404),
    ],
)
def test_x_request_id_comes_back_on_every_response(
    server: BackgroundServer, method: str, path: str, body: Any, status: int
) -> None:
    response = httpx.request(
        method, f"{server.base_url}{path}", json=body, headers={"X-Request-Id": "trace-42"}, timeout=30
    )
    assert response.status_code == status
    assert response.headers.get_list("x-request-id") == ["trace-42"]
    # A request without one gets its own, never another request's.
    made = httpx.get(f"{server.base_url}/health").headers.get_list("x-request-id")
    assert len(made) == 1 and made[0].startswith("req_") and made[0] != "trace-42"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}),
        ("POST", "/v1/chat/completions", {"messages": []}),
        ("GET", "/nothing", None),
    ],
)
def test_a_request_without_x_request_id_gets_one_made_for_it(
    server: BackgroundServer, method: str, path: str, body: Any
) -> None:
    made = [
        httpx.request(method, f"{server.base_url}{path}", json=body, timeout=30).headers.get_list(
            "x-request-id"
        )
        for _ in range(2)
    ]
    assert all(len(ids) == 1 and ids[0].startswith("req_") for ids in made)
    assert made[0] != made[1]


def test_x_request_id_comes_back_on_a_500_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine()
    engine.unexpected_error = RuntimeError("an engine bug")
    with BackgroundServer(engine) as server, caplog.at_level(logging.ERROR, "batchlm.server.errors"):
        response = httpx.post(
            f"{server.base_url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "trace-500"}
        )
        made = httpx.post(f"{server.base_url}/v1/chat/completions", json=CHAT).headers.get("x-request-id")
    assert response.status_code == 500 and response.headers.get_list("x-request-id") == ["trace-500"]
    assert made is not None and made.startswith("req_")
    logged = [record.getMessage() for record in caplog.records]
    assert any("X-Request-Id trace-500" in line for line in logged)
    assert any(f"X-Request-Id {made}" in line for line in logged)


def test_a_request_s_log_line_carries_its_x_request_id(caplog: pytest.LogCaptureFixture) -> None:
    with BackgroundServer(FakeEngine()) as server, caplog.at_level(logging.DEBUG, "batchlm.server.metrics"):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "trace-9"})
    [line] = [r.getMessage() for r in caplog.records if "x_request_id" in r.getMessage()]
    assert (
        line.startswith("request chatcmpl-")
        and ": length," in line
        and line.endswith(" x_request_id=trace-9")
    )


def test_x_request_id_comes_back_on_a_401() -> None:
    with BackgroundServer(FakeEngine(), ServerSettings(api_key="sk-right")) as server:
        response = httpx.get(f"{server.base_url}/v1/models", headers={"X-Request-Id": "trace-7"})
    assert response.status_code == 401 and response.headers["x-request-id"] == "trace-7"


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize(
    ("path", "template", "param"),
    [
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", '
            '"json_schema": {"name": "x", "schema": {"type": "number", "maximum": %s}}}}',
            "response_format",
        ),
        (
            "/v1/completions",
            '{"prompt": "hi", "structured_outputs": {"json": {"maximum": %s}}}',
            "structured_outputs",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required", "tools": [{"type": '
            '"function", "function": {"name": "f", "parameters": {"type": "object", "properties": '
            '{"a": {"type": "number", "minimum": %s}}}}}]}',
            "tools[0].function.parameters",
        ),
    ],
)
def test_a_schema_with_a_non_finite_number_is_400_saying_so(
    server: BackgroundServer, path: str, template: str, param: str, number: str
) -> None:
    error = error_of(post(server, path, (template % number).encode(), {}), 400)
    assert error["param"] == param
    assert "NaN or Infinity" in error["message"]


def test_the_body_watch_times_out_only_reads_that_wait() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        patient = BodyWatch(3600.0)
        assert await patient.read(asyncio.sleep(0, result="body")) == "body"

        # Someone else's cancel is theirs: it is not reported as a timeout.
        stalled = asyncio.ensure_future(patient.read(loop.create_future()))
        await asyncio.sleep(0)
        stalled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stalled

        async def read_never() -> None:
            with pytest.raises(BodyTimeout):
                await BodyWatch(0.01).read(loop.create_future())
            task = asyncio.current_task()
            assert task is not None and getattr(task, "cancelling", lambda: 0)() == 0

        await read_never()

    asyncio.run(scenario())


def test_a_schema_object_with_nan_is_refused_where_it_is_made() -> None:
    with pytest.raises(SamplingParamsError, match="NaN or Infinity"):
        StructuredOutputs(json={"type": "number", "maximum": math.inf})


def test_a_401_says_whether_the_key_or_the_scheme_is_wrong() -> None:
    with BackgroundServer(FakeEngine(), ServerSettings(api_key="sk-right")) as server:
        url = f"{server.base_url}/v1/models"
        responses = {
            sent: httpx.get(url, headers={"authorization": sent})
            for sent in ("sk-right", "Basic sk-right", "Bearer sk-wrong", "Bearer")
        }
        assert httpx.get(url, headers={"authorization": "Bearer  sk-right"}).status_code == 200
    for sent, response in responses.items():
        error = error_of(response, 401)
        assert error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
        scheme_named = "does not use Bearer auth" in error["message"]
        assert scheme_named == (not sent.startswith("Bearer")), (sent, error["message"])
        assert "sk-right" not in error["message"]
