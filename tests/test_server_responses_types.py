"""POST /v1/responses read by the openai client's own typed models, validated (not constructed the
lenient way the client reads them): every streamed event by the model of its type, the body and the
stored copy as a Response. A field the client types require and the server leaves out, or a value
outside the client's enums, fails here."""

from __future__ import annotations

import json
import typing
from typing import Any

import httpx
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel

from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine
from tools_harness import HERMES_REPLY, TOOLS

FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]
# Thinking, text, a call and text after it: every kind of output item.
EVERY_ITEM = f"<think>\nThe user wants Paris.\n</think>\n\n{HERMES_REPLY}\nDone."
LOGPROBS = ["message.output_text.logprobs"]


def _event_models() -> dict[str, type[BaseModel]]:
    """The client's model of each event type."""
    (members, *_) = typing.get_args(ResponseStreamEvent)
    return {
        typing.get_args(model.model_fields["type"].annotation)[0]: model for model in typing.get_args(members)
    }


EVENT_MODELS = _event_models()


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096, cached_tokens=3)


@pytest.fixture(scope="module")
def server_settings() -> ServerSettings:
    return ServerSettings(reasoning_parser="think")


def stream_payloads(server: BackgroundServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    return [json.loads(line.removeprefix("data: ")) for line in lines]


def assert_typed(payloads: list[dict[str, Any]]) -> None:
    for payload in payloads:
        EVENT_MODELS[payload["type"]].model_validate(payload)


@pytest.mark.parametrize(
    "body",
    [
        {"tools": FLAT_TOOLS},
        {"tools": FLAT_TOOLS, "max_output_tokens": 40},
        {"include": LOGPROBS, "top_logprobs": 2},
        {"text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}}},
    ],
    ids=["every-item", "incomplete", "logprobs", "json-schema"],
)
def test_events_bodies_and_stored_copies_are_the_clients_types(
    server: BackgroundServer, engine: FakeEngine, body: dict[str, Any]
) -> None:
    engine.reply = EVERY_ITEM
    payloads = stream_payloads(server, {"input": "hi", **body})
    assert_typed(payloads)
    final = payloads[-1]["response"]
    assert final["usage"]["input_tokens_details"] == {"cached_tokens": 3, "cache_write_tokens": 0}
    whole = httpx.post(f"{server.base_url}/v1/responses", json={"input": "hi", **body}).json()
    Response.model_validate(whole)
    stored = httpx.get(f"{server.base_url}/v1/responses/{whole['id']}").json()
    Response.model_validate(stored)
    assert stored == whole


def test_a_stream_the_engine_fails_ends_in_the_clients_types() -> None:
    # ignore_eos: the reply goes on until the engine dies, however slowly the stream is read.
    engine = FakeEngine(max_model_len=20_000, token_delay_s=0.01)
    with BackgroundServer(engine) as server:
        body = {"input": "hi", "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=30) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: ") and "response.output_text.delta" in line:
                    break
            engine.kill()
            rest = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    error, failed = rest[-2:]
    assert (error["type"], error["code"]) == ("error", "engine_unavailable")
    assert failed["type"] == "response.failed" and failed["response"]["error"]["code"] == "server_error"
    assert_typed(rest)
