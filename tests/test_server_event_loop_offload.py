"""Work whose cost grows with what a client sends is done off the event loop, so that other clients
(/health here) are answered meanwhile: compiling a structured-output constraint or a forced tool's
schema (a megabyte of JSON schema takes seconds), and rendering a conversation of many messages.

Each test holds that work on a gate and asks /health while it waits (gated_work)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from batchlm.sampling_params import StructuredOutputs
from batchlm.server.background import BackgroundServer
from batchlm.structured import spec_grammar
from fake_engine import FakeEngine, FakeTokenizer
from gated_work import Gate, answered_while_held


@pytest.fixture
def gated_grammars(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Gate, str]]:
    """Grammars whose schema holds the returned marker wait on the gate while they are compiled."""
    gate, marker = Gate(), f"gated-{uuid.uuid4().hex}"  # a new schema each time: none is cached
    real = spec_grammar.grammar_text

    def gated(spec: StructuredOutputs) -> str:
        if spec.json is not None and marker in spec.json:
            gate.hold()
        return real(spec)

    monkeypatch.setattr(spec_grammar, "grammar_text", gated)
    yield gate, marker
    gate.open.set()


def schema(marker: str) -> dict[str, Any]:
    return {"type": "object", "properties": {"a": {"type": "string", "description": marker}}}


def test_a_completion_s_json_schema_is_compiled_off_the_event_loop(
    gated_grammars: tuple[Gate, str],
) -> None:
    gate, marker = gated_grammars
    body = {"prompt": "hi", "max_tokens": 4, "structured_outputs": {"json": schema(marker)}}
    with BackgroundServer(FakeEngine()) as server:
        response = answered_while_held(server, gate, lambda client: client.post("/v1/completions", json=body))
    assert response.status_code == 200, response.text


def test_a_chat_response_format_is_compiled_off_the_event_loop(gated_grammars: tuple[Gate, str]) -> None:
    gate, marker = gated_grammars
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema(marker)}},
    }
    with BackgroundServer(FakeEngine()) as server:
        response = answered_while_held(
            server, gate, lambda client: client.post("/v1/chat/completions", json=body)
        )
    assert response.status_code == 200, response.text


def test_a_forced_tool_s_schema_is_checked_off_the_event_loop(gated_grammars: tuple[Gate, str]) -> None:
    gate, marker = gated_grammars
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": schema(marker)}}],
    }
    with BackgroundServer(FakeEngine()) as server:
        response = answered_while_held(
            server, gate, lambda client: client.post("/v1/chat/completions", json=body)
        )
    assert response.status_code == 200, response.text


def test_a_schema_that_does_not_compile_is_still_a_400_naming_its_field() -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
    }
    with BackgroundServer(FakeEngine()) as server:
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format"


class GatedTemplateTokenizer(FakeTokenizer):
    """Its chat template waits on the gate for conversations of more than `over` messages."""

    def __init__(self, gate: Gate, over: int) -> None:
        super().__init__()
        self.gate, self.over = gate, over

    def render_chat_template(self, messages: list[dict[str, Any]], *args: Any, **kwargs: Any) -> str:
        if len(messages) > self.over:
            self.gate.hold()
        return super().render_chat_template(messages, *args, **kwargs)


def test_many_short_messages_are_rendered_off_the_event_loop() -> None:
    gate = Gate()
    messages = [{"role": "user", "content": ""}] * 1000  # short in characters, long in template work
    tokenizer = GatedTemplateTokenizer(gate, over=100)
    with BackgroundServer(FakeEngine(tokenizer=tokenizer, max_model_len=16384)) as server:
        body = {"messages": messages, "max_tokens": 4}
        response = answered_while_held(
            server, gate, lambda client: client.post("/v1/chat/completions", json=body)
        )
    assert response.status_code == 200, response.text
