"""FastGenerationRoutes: valid JSON bodies of the two generation endpoints go straight to their handlers;
everything else reaches FastAPI (the inner app) with the body intact."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.responses import JSONResponse

from batchlm.server import fast_routes
from batchlm.server.errors import APIError
from batchlm.server.fast_routes import FastGenerationRoutes
from batchlm.server.protocol import CompletionRequest


class Recorder:
    """The inner app (FastAPI's place): records what reached it and the body it could read."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        message = await receive()
        self.bodies.append(message.get("body", b""))
        await JSONResponse({"from": "fastapi"}, status_code=422)(scope, receive, send)


def _run(app: Any, path: str, body: bytes, content_type: bytes | None = b"application/json",
         chunks: int = 1, disconnect: bool = False) -> tuple[int | None, bytes]:  # fmt: skip
    headers = [(b"content-type", content_type)] if content_type is not None else []
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b""}
    size = max(1, -(-len(body) // chunks))
    pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    incoming = [{"type": "http.disconnect"}] if disconnect else [
        {"type": "http.request", "body": piece, "more_body": index < len(pieces) - 1}
        for index, piece in enumerate(pieces)
    ]  # fmt: skip
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.fixture
def handled(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace the completions handler with one that records its parsed body."""
    calls: list[Any] = []

    async def handler(request: Any, body: Any) -> JSONResponse:
        calls.append(body)
        assert await request.body() == json.dumps({"model": "m", "prompt": "hi"}).encode()  # replayed
        if body.prompt == "boom":
            raise APIError(404, "no such model", param="model")
        return JSONResponse({"from": "fast"})

    monkeypatch.setitem(fast_routes.ROUTES, "/v1/completions", (CompletionRequest, handler))
    return calls


def test_a_valid_body_goes_straight_to_the_handler(handled: list[Any]) -> None:
    inner, errors = Recorder(), []
    app = FastGenerationRoutes(inner, errors.append)
    body = json.dumps({"model": "m", "prompt": "hi"}).encode()
    for chunks in (1, 3):
        assert _run(app, "/v1/completions", body, chunks=chunks) == (200, b'{"from":"fast"}')
    assert _run(app, "/v1/completions", body, content_type=None)[0] == 200  # no content type: JSON too
    assert [call.prompt for call in handled] == ["hi"] * 3
    assert inner.bodies == [] and errors == []


@pytest.mark.parametrize(
    "body",
    [b"", b"{not json", b'{"model": "m", "prompt": "hi", "bogus": 1}', b'{"model": "m", "prompt": 7}', b"[]"],
    ids=["empty", "malformed", "unknown field", "wrong type", "not an object"],
)
def test_anything_invalid_reaches_fastapi_with_its_body(handled: list[Any], body: bytes) -> None:
    inner = Recorder()
    assert _run(FastGenerationRoutes(inner, [].append), "/v1/completions", body) == (
        422,
        b'{"from":"fastapi"}',
    )
    assert inner.bodies == [body] and handled == []


@pytest.mark.parametrize(
    "path,content_type",
    [("/v1/completions", b"text/plain"), ("/tokenize", b"application/json")],
)
def test_other_routes_and_content_types_are_left_to_fastapi(
    handled: list[Any], path: str, content_type: bytes
) -> None:
    inner = Recorder()
    body = json.dumps({"model": "m", "prompt": "hi"}).encode()
    assert _run(FastGenerationRoutes(inner, [].append), path, body, content_type=content_type)[0] == 422
    assert inner.bodies == [body] and handled == []


def test_api_errors_become_openai_errors_and_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    async def handler(request: Any, body: Any) -> JSONResponse:
        raise APIError(404, "The model 'x' does not exist.", param="model", code="model_not_found")

    monkeypatch.setitem(fast_routes.ROUTES, "/v1/completions", (CompletionRequest, handler))
    errors: list[int] = []
    status, body = _run(
        FastGenerationRoutes(Recorder(), errors.append), "/v1/completions", b'{"model":"x","prompt":"a"}'
    )
    assert status == 404 and errors == [404]
    assert json.loads(body)["error"] == {
        "message": "The model 'x' does not exist.", "type": "invalid_request_error", "param": "model", "code": "model_not_found"
    }  # fmt: skip


def test_a_client_gone_before_its_body_gets_nothing(handled: list[Any]) -> None:
    inner = Recorder()
    assert _run(FastGenerationRoutes(inner, [].append), "/v1/completions", b"", disconnect=True) == (
        None,
        b"",
    )
    assert inner.bodies == [] and handled == []


def test_the_app_puts_it_inside_the_key_and_size_checks() -> None:
    from batchlm.server.app import build_app
    from batchlm.server.middleware import APIKeyMiddleware, BodySizeLimitMiddleware
    from batchlm.server.state import ServerSettings
    from fake_engine import FakeEngine

    app = build_app(FakeEngine(), ServerSettings(api_key="k"))
    order = [middleware.cls for middleware in app.user_middleware]  # outermost first
    assert (
        order.index(APIKeyMiddleware)
        < order.index(BodySizeLimitMiddleware)
        < order.index(FastGenerationRoutes)
    )
    assert order[-1] is FastGenerationRoutes
