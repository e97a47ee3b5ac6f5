"""A request body nested past json_text.MAX_DEPTH is one 400 on every JSON route, however it arrives
(the fast path's reader, FastAPI's), and a body at the bound is served: the same bodies a batch file's
line may carry."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pydantic_core
import pytest

from batchlm import json_text
from batchlm.server import fast_routes
from batchlm.server.background import BackgroundServer
from batchlm.server.routes import router
from error_shape import error_of
from fake_engine import FakeEngine

ROUTES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/responses": {"input": "hi", "max_output_tokens": 2},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2]},
}


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer(FakeEngine(max_model_len=64)) as running:
        yield running


def nested(body: dict[str, Any], depth: int, leaf: Any = 1) -> dict[str, Any]:
    """`body` with an unknown field whose value puts `leaf` inside `depth` arrays or objects, the body
    counted: a field the route ignores or refuses, which only the nesting check may answer first."""
    value = leaf
    for level in range(depth - 1):
        value = [value] if level % 2 else {"k": value}
    return {**body, "extra": value}


def post(server: BackgroundServer, path: str, body: dict[str, Any] | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    return httpx.post(f"{server.base_url}{path}", content=content, headers=headers, timeout=60)


def test_the_nesting_counted_is_what_the_request_reader_refuses() -> None:
    """pydantic's reader (the fast path) and json_text count the same levels: a leaf value inside at
    most MAX_DEPTH arrays or objects, an empty array or object being a leaf."""
    rng = random.Random(0)
    for _ in range(300):
        depth = rng.randint(json_text.MAX_DEPTH - 3, json_text.MAX_DEPTH + 3)
        text = "".join(rng.choice(["[", '{"a":']) for _ in range(depth))
        opened = [c for c in text if c in "[{"]
        text += rng.choice(["1", "[]", "{}", '"x"'])
        text += "".join("]" if c == "[" else "}" for c in reversed(opened))
        try:
            pydantic_core.from_json(text)
            read = True
        except ValueError as error:
            assert "recursion limit" in str(error)
            read = False
        try:
            json_text.loads(text)
            loaded = True
        except json_text.NestingTooDeep:
            loaded = False
        assert read == loaded, text


@pytest.mark.parametrize("path", list(ROUTES))
@pytest.mark.parametrize("leaf", [1, [], {}])
def test_a_body_at_the_bound_is_not_refused_for_its_depth(
    server: BackgroundServer, path: str, leaf: Any
) -> None:
    response = post(server, path, nested(ROUTES[path], json_text.MAX_DEPTH, leaf))
    # The extra field itself may be refused (strict routes), but not for nesting.
    assert response.status_code in (200, 400), response.text
    assert "levels" not in response.text
    assert response.status_code == 200 or "extra" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", list(ROUTES))
@pytest.mark.parametrize("depth", [json_text.MAX_DEPTH + 1, 900, 5000])
def test_a_body_past_the_bound_is_one_400_saying_so(server: BackgroundServer, path: str, depth: int) -> None:
    # Written out: json.dumps itself cannot nest this deep.
    deep = "[" * (depth - 1) + "1" + "]" * (depth - 1)
    body = f'{json.dumps(ROUTES[path])[:-1]}, "extra": {deep}}}'.encode()
    error = error_of(post(server, path, body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["message"] == (
        "The request body could not be parsed as JSON: "
        f"its arrays or objects nest more than {json_text.MAX_DEPTH} levels deep."
    )


@pytest.mark.parametrize("path", list(ROUTES))
def test_a_deep_body_that_is_also_malformed_is_still_400(server: BackgroundServer, path: str) -> None:
    for body in (b"[" * 5000, b'{"prompt": "\\ud800", "x": ' + b"[" * 300 + b"]" * 300 + b"}"):
        error_of(post(server, path, body), 400)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_a_body_at_the_bound_is_served(server: BackgroundServer, path: str) -> None:
    value: Any = 1
    for _ in range(json_text.MAX_DEPTH - 2):  # the body and chat_template_kwargs are two levels
        value = [value]
    body = {**ROUTES[path], "chat_template_kwargs": {"x": value}}
    assert post(server, path, body).status_code == 200
    body["chat_template_kwargs"] = {"x": [value]}
    assert "nest more than" in error_of(post(server, path, body), 400)["message"]


def test_every_route_with_a_json_body_has_its_nesting_checked() -> None:
    """A new route with a body is refused here until the nesting check covers it."""
    with_body = {route.path for route in router.routes if getattr(route, "body_field", None) is not None}
    assert with_body == set(fast_routes.ROUTES) | fast_routes.DEPTH_CHECKED
