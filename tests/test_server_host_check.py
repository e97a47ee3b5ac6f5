"""The Host check (--allowed-hosts): a page that re-points its own name at 127.0.0.1 (DNS rebinding) is
refused on every route, as is a request a page on another site sends (its Origin); the names a local
server is reached by pass. The setting itself: tests/test_server_allowed_hosts_setting.py."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.types import Message, Scope
from starlette.websockets import WebSocketDisconnect

from batchlm.server.allowed_hosts import (
    ANY_HOST,
    parse_allowed_hosts,
    resolve_allowed_hosts,
)
from batchlm.server.app import build_app
from batchlm.server.background import BackgroundServer
from batchlm.server.middleware import HostCheckMiddleware
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine

REBOUND = "attacker.example:8080"
LOOPBACK = ServerSettings(allowed_hosts=resolve_allowed_hosts(None, "127.0.0.1"))
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(build_app(engine, LOOPBACK)) as running:
        yield running


def assert_refused(response: Any, name: str = "attacker.example") -> None:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "host_not_allowed",
        None,
    )
    assert "DNS rebinding" in error["message"]
    assert f"--allowed-hosts {name}" in error["message"]
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/health"),
        ("GET", "/metrics"),
        ("GET", "/version"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/responses/resp_123"),
        ("GET", "/v1/responses/resp_123/input_items"),
        ("POST", "/tokenize"),
        ("GET", "/"),
        ("GET", "/ui/chat.js"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/no/such/route"),
    ],
)
def test_a_rebound_host_is_refused_on_every_route(
    client: TestClient, engine: FakeEngine, method: str, path: str
) -> None:
    body = CHAT if method == "POST" else None
    assert_refused(client.request(method, path, json=body, headers={"Host": REBOUND}))
    assert engine.calls == []


def test_a_cors_preflight_is_refused_too(client: TestClient) -> None:
    preflight = {
        "Host": REBOUND,
        "Origin": "http://attacker.example:8080",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    assert_refused(client.options("/v1/chat/completions", headers=preflight))


def test_a_refusal_is_counted_and_logged_once_per_host(client: TestClient, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="batchlm.server.middleware"):
        for _ in range(3):
            assert client.get("/health", headers={"Host": REBOUND}).status_code == 403
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and REBOUND in warnings[0] and "--allowed-hosts" in warnings[0]
    metrics = client.get("/metrics", headers={"Host": "localhost"}).text
    assert 'batchlm_requests_total{outcome="error_403"} 3.0' in metrics.splitlines()


@pytest.mark.parametrize(
    "origin",
    [
        "https://attacker.example",
        "http://attacker.example:8000",
        "null",
        "https://attacker.example/page",
        "x",
    ],
)
def test_a_page_on_another_site_may_not_send_requests_from_its_visitor_s_browser(
    client: TestClient, engine: FakeEngine, origin: str
) -> None:
    # The Host is the local server's own: a form or a no-cors fetch posts to 127.0.0.1 directly.
    headers = {"Host": "127.0.0.1:8000", "Origin": origin}
    response = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "origin_not_allowed" and origin in error["message"]
    flag = "--allowed-hosts attacker.example" if "attacker" in origin and "/page" not in origin else "'*'"
    assert flag in error["message"]
    preflight = {**headers, "Access-Control-Request-Method": "POST"}
    assert client.options("/v1/chat/completions", headers=preflight).status_code == 403
    assert engine.calls == []


@pytest.mark.parametrize("origin", ["http://localhost:8000", "http://127.0.0.1:8000", "http://[::1]:8000"])
def test_the_chat_page_s_own_requests_pass(client: TestClient, origin: str) -> None:
    headers = {"Host": "localhost:8000", "Origin": origin}
    assert client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200


@pytest.mark.parametrize(
    "origin",
    [
        "chrome-extension://bpoadfkcbjbfhfodiogcnhaaaaaaaaaa",
        "moz-extension://3c4f5a6b-1d2e-4f00-9a8b-0123456789ab",
        "safari-web-extension://5E4B2C1D-0000-4A4A-8B8B-ABCDEFABCDEF",
        "vscode-webview://1n2o3p4q5r6s7t8u9v0w",
        "tauri://localhost",
        "app://chat-app",
        "file://",
    ],
)
def test_a_browser_extension_s_requests_pass(client: TestClient, engine: FakeEngine, origin: str) -> None:
    # An extension's pages and background script send their own origin, which no web page can: such
    # chat and translation front-ends call a local server as clients other than browsers do.
    headers = {"Host": "localhost:8000", "Origin": origin}
    assert client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    assert len(engine.calls) == 1
    # The scheme makes it an extension, not a name that looks like one.
    headers = {"Host": "localhost:8000", "Origin": "https://chrome-extension.attacker.example"}
    assert client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 403


def test_the_chat_page_behind_a_proxy_that_sets_the_host_passes(engine: FakeEngine) -> None:
    # README's nginx example (proxy_pass http://127.0.0.1:8080/) sends the Host it connects to; the
    # browser's Origin is the proxy's name, and its Sec-Fetch-Site says the page requests its own origin.
    settings = replace(LOOPBACK, root_path="/llm")
    page = {"Host": "127.0.0.1:8080", "Origin": "https://llm.example"}
    with TestClient(build_app(engine, settings)) as client:
        own = {**page, "Sec-Fetch-Site": "same-origin"}
        assert client.post("/v1/chat/completions", json=CHAT, headers=own).status_code == 200
        # Another site's page, even one the proxy's name is under, is still refused.
        for site in ("same-site", "cross-site", "none"):
            other = {**page, "Sec-Fetch-Site": site}
            response = client.post("/v1/chat/completions", json=CHAT, headers=other)
            assert response.json()["error"]["code"] == "origin_not_allowed"
        # The Host check is not lifted: a rebound page's requests to its own origin name its host.
        rebound = {"Host": REBOUND, "Origin": f"http://{REBOUND}", "Sec-Fetch-Site": "same-origin"}
        assert_refused(client.post("/v1/chat/completions", json=CHAT, headers=rebound))
    assert len(engine.calls) == 1


def test_pages_on_allowed_hosts_pass_and_any_host_checks_no_origin(engine: FakeEngine) -> None:
    allowed = resolve_allowed_hosts(parse_allowed_hosts("*.example.com"), "127.0.0.1")
    with TestClient(build_app(engine, ServerSettings(allowed_hosts=allowed))) as client:
        headers = {"Host": "localhost", "Origin": "https://chat.example.com"}
        assert client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    with TestClient(build_app(engine, ServerSettings(allowed_hosts=ANY_HOST))) as client:
        headers = {"Host": "localhost", "Origin": "https://attacker.example"}
        assert client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:8080",
        "LocalHost:8080",
        "localhost.",
        "chat.localhost:3000",
        "127.0.0.1",
        "127.0.0.1:8080",
        "127.4.5.6:8080",
        # Other spellings of a loopback address, as curl sends them where they are typed.
        "127.1:8080",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "2130706433:8080",
        "[::1]",
        "[::1]:8080",
        "[0:0:0:0:0:0:0:1]:8080",
    ],
)
def test_the_names_of_a_local_server_pass(client: TestClient, host: str) -> None:
    assert client.get("/health", headers={"Host": host}).status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT, headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example",
        "localhost.attacker.example",
        "127.0.0.1.attacker.example",
        "0.0.0.0:8080",
        "192.168.1.5:8080",
        "3232235781:8080",
        "127.0.0.256",
        "127.0.0.1.5",
        "attacker.0x7f",
        "[::1]x",
        "[::1",
        "localhost:http",
        "local host",
    ],
)
def test_other_hosts_and_malformed_ones_are_refused(client: TestClient, host: str) -> None:
    response = client.get("/health", headers={"Host": host})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "host_not_allowed"


def call(app: Any, headers: list[tuple[bytes, bytes]]) -> int:
    """The status the ASGI `app` answers a GET / with `headers` (as the server hands them over)."""
    scope: Scope = {"type": "http", "method": "GET", "path": "/", "headers": headers, "query_string": b""}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return int(sent[0]["status"])


async def ok(scope: Scope, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_a_request_without_a_host_passes_and_every_host_header_is_checked() -> None:
    check = HostCheckMiddleware(ok, LOOPBACK.allowed_hosts or ANY_HOST, observe=lambda status: None)
    assert call(check, []) == 200  # HTTP/1.0 sends none
    assert call(check, [(b"host", b"")]) == 200
    assert call(check, [(b"host", b"localhost")]) == 200
    assert call(check, [(b"host", b"localhost"), (b"host", b"attacker.example")]) == 403
    assert call(check, [(b"host", b"attacker.example"), (b"host", b"localhost")]) == 403
    assert call(check, [(b"host", b"localhost"), (b"origin", b"http://localhost")]) == 200
    assert call(check, [(b"host", b"localhost"), (b"origin", b"http://attacker.example")]) == 403


def test_a_websocket_for_a_rebound_host_is_closed(client: TestClient) -> None:
    with (
        pytest.raises(WebSocketDisconnect) as closed,
        client.websocket_connect("/ws", headers={"Host": REBOUND}),
    ):
        pass
    assert closed.value.code == 1008


def test_under_a_root_path_too(engine: FakeEngine) -> None:
    settings = replace(LOOPBACK, root_path="/llm")
    with TestClient(build_app(engine, settings)) as client:
        for path in ("/llm/health", "/health", "/llm", "/llm/v1/models"):
            assert_refused(client.get(path, headers={"Host": REBOUND}))
        assert client.get("/llm/health", headers={"Host": "localhost:8080"}).status_code == 200


def test_star_allows_any_host(engine: FakeEngine) -> None:
    settings = ServerSettings(allowed_hosts=resolve_allowed_hosts(parse_allowed_hosts("*"), "127.0.0.1"))
    assert settings.allowed_hosts == ANY_HOST
    with TestClient(build_app(engine, settings)) as client:
        assert client.get("/health", headers={"Host": REBOUND}).status_code == 200


def test_listed_names_and_the_names_under_a_wildcard_pass(engine: FakeEngine) -> None:
    listed = parse_allowed_hosts("api.example.com, *.corp.example,[fd00::5],10.1")
    settings = ServerSettings(allowed_hosts=resolve_allowed_hosts(listed, "0.0.0.0"))
    with TestClient(build_app(engine, settings)) as client:
        for host in (
            "api.example.com",
            "API.example.com:443",
            "chat.corp.example",
            "[fd00::5]:8080",
            "10.0.0.1",
            "0xa.1:8080",
            "localhost",
        ):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
        for host in (
            "corp.example",
            "example.com",
            "api.example.com.attacker.example",
            "0.0.0.0",
            "10.1.0.1",
        ):
            assert client.get("/health", headers={"Host": host}).status_code == 403, host


def exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_over_a_real_connection() -> None:
    with BackgroundServer(FakeEngine(), LOOPBACK) as server:
        refused = exchange(
            server.port, b"GET /health HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n"
        )
        assert refused.startswith(b"HTTP/1.1 403 ") and b'"host_not_allowed"' in refused
        served = exchange(
            server.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        assert served.startswith(b"HTTP/1.1 200 ")
        assert exchange(server.port, b"GET /health HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")
        # A body left unread: the answer still arrives whole, and the connection closes after it.
        body = b'{"model": "fake-model", "prompt": "' + b"a" * 200_000 + b'"}'
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: attacker.example\r\nContent-Type: application/json\r\n"
        )
        refused = exchange(server.port, head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert (
            refused.startswith(b"HTTP/1.1 403 ")
            and refused.endswith(b"}")
            and b"connection: close" in refused
        )
    assert server.engine.calls == []  # type: ignore[attr-defined]
