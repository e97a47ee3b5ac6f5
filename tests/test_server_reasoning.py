"""A reasoning model's thinking through the official openai client: `reasoning_content` beside the
answer, streamed and not, beside tool calls and under a response_format, on a live server whose fake
engine replies with a thinking block."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine, openai_client
from tools_harness import HERMES_REPLY, PARIS, TOOLS, USER

THOUGHT = "The user wants Paris.\nSo: Paris."
REPLY = f"<think>\n{THOUGHT}\n</think>\n\nIt is Paris."


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


@pytest.fixture(scope="module")
def server_settings() -> ServerSettings:
    return ServerSettings(reasoning_parser="think")


def test_the_thinking_comes_as_reasoning_content(client: Any, engine: FakeEngine) -> None:
    engine.reply = REPLY
    [choice] = client.chat.completions.create(model="fake-model", messages=USER).choices
    assert choice.message.reasoning_content == THOUGHT
    assert choice.message.content == "It is Paris."
    assert choice.finish_reason == "stop"


def test_a_stream_sends_the_thinking_then_the_answer(client: Any, engine: FakeEngine) -> None:
    engine.reply = REPLY
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
    content = [d.content for d in deltas if d.content]
    assert "".join(reasoning) == THOUGHT and "".join(content) == "It is Paris."
    assert len(reasoning) > 1, "the thinking streams as it arrives"
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not getattr(d, "reasoning_content", None) for d in deltas[first_content:])


def test_usage_counts_the_thinking_tokens(client: Any, engine: FakeEngine) -> None:
    engine.reply = REPLY
    # The fake spells a byte a token: the thinking is the block, markers included.
    thinking = len(f"<think>\n{THOUGHT}\n</think>".encode())
    response = client.chat.completions.create(model="fake-model", messages=USER)
    assert response.usage.completion_tokens == len(REPLY.encode())
    assert response.usage.completion_tokens_details.reasoning_tokens == thinking
    stream = client.chat.completions.create(
        model="fake-model", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    [usage] = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage.completion_tokens_details.reasoning_tokens == thinking
    cut_short = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=16)
    assert cut_short.usage.completion_tokens_details.reasoning_tokens == 16
    engine.reply = "No thinking here."
    plain = client.chat.completions.create(model="fake-model", messages=USER, n=2)
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0


def test_reasoning_effort_reaches_the_template(
    client: Any, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.reply = REPLY
    client.chat.completions.create(model="fake-model", messages=USER, reasoning_effort="low")
    assert engine.tokenizer.last_chat["kwargs"] == {"reasoning_effort": "low"}
    # "none" switches thinking off where the template has a variable for it, unless the client set it.
    client.chat.completions.create(model="fake-model", messages=USER, reasoning_effort="none")
    assert engine.tokenizer.last_chat["kwargs"] == {"reasoning_effort": "none"}
    monkeypatch.setattr(engine.tokenizer, "chat_template", "{% if enable_thinking %}", raising=False)
    client.chat.completions.create(model="fake-model", messages=USER, reasoning_effort="none")
    assert engine.tokenizer.last_chat["kwargs"] == {"reasoning_effort": "none", "enable_thinking": False}
    kept = {"enable_thinking": True}
    client.chat.completions.create(
        model="fake-model", messages=USER, reasoning_effort="none", extra_body={"chat_template_kwargs": kept}
    )
    assert engine.tokenizer.last_chat["kwargs"] == {"reasoning_effort": "none", "enable_thinking": True}
    # Seed-OSS turns thinking off by a budget of 0.
    monkeypatch.setattr(engine.tokenizer, "chat_template", "{% if thinking_budget == 0 %}", raising=False)
    client.chat.completions.create(model="fake-model", messages=USER, reasoning_effort="none")
    assert engine.tokenizer.last_chat["kwargs"] == {"reasoning_effort": "none", "thinking_budget": 0}


def test_reasoning_effort_is_refused_where_it_cannot_apply(server: BackgroundServer) -> None:
    def post(base_url: str, effort: str) -> httpx.Response:
        body = {"model": "fake-model", "messages": USER, "reasoning_effort": effort}
        return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30)

    wrong = post(server.base_url, "extreme")
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "reasoning_effort"
    # The fake has no chat template, so `auto` finds no reasoning model to apply the effort to.
    with BackgroundServer(FakeEngine(reply=REPLY, max_model_len=4096)) as running:
        refused = post(running.base_url, "high")
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "reasoning_effort"
    assert "does not reason" in refused.json()["error"]["message"]


def test_calls_after_the_thinking(client: Any, engine: FakeEngine) -> None:
    engine.reply = f"<think>{THOUGHT}</think>{HERMES_REPLY}"
    [choice] = client.chat.completions.create(model="fake-model", messages=USER, tools=TOOLS).choices
    assert choice.message.reasoning_content == THOUGHT
    assert choice.message.content == "Let me look."
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", json.loads(PARIS))
    assert choice.finish_reason == "tool_calls"
    stream = client.chat.completions.create(model="fake-model", messages=USER, tools=TOOLS, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == THOUGHT
    assert "".join(d.content or "" for d in deltas) == "Let me look."
    assert [c.function.name for d in deltas for c in d.tool_calls or [] if c.function.name] == ["get_weather"]


def test_a_response_format_holds_after_the_thinking(client: Any, engine: FakeEngine) -> None:
    engine.reply = f"<think>{THOUGHT}</think>" + '{"city": "Paris"}'
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    [choice] = client.chat.completions.create(
        model="fake-model", messages=USER, response_format=response_format
    ).choices
    assert choice.message.reasoning_content == THOUGHT
    assert json.loads(choice.message.content) == {"city": "Paris"}
    constraint = engine.calls[-1].params.structured_outputs
    assert constraint is not None and json.loads(constraint.json) == schema
    # The prompt does not open a block: the thinking is optional, and begins with the start marker.
    assert constraint.preamble is not None and constraint.preamble.startswith('preamble: ("<think>" free')


def test_a_thinking_cut_short_is_all_reasoning(client: Any, engine: FakeEngine) -> None:
    engine.reply = REPLY
    [choice] = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=16).choices
    assert choice.finish_reason == "length"
    assert choice.message.reasoning_content == "The user"
    assert choice.message.content is None


@pytest.mark.parametrize("max_tokens", [16, None], ids=["cut-while-thinking", "whole"])
def test_the_stream_helper_adds_up_the_message_create_gives(
    client: Any, engine: FakeEngine, max_tokens: int | None
) -> None:
    """The client's stream helper accumulates the deltas into the message: thinking cut short leaves
    its content null there too, not the role chunk's empty text."""
    engine.reply = REPLY
    fields = {"model": "fake-model", "messages": USER, "max_tokens": max_tokens}
    whole = client.chat.completions.create(**fields).choices[0].message
    with client.chat.completions.stream(**fields) as stream:
        for _ in stream:
            pass
        streamed = stream.current_completion_snapshot.choices[0].message
    assert streamed.content == whole.content
    assert streamed.reasoning_content == whole.reasoning_content
    assert (whole.content is None) == (max_tokens is not None)


def test_history_carries_the_thinking_to_the_template(client: Any, engine: FakeEngine) -> None:
    engine.reply = "Fine."
    messages = [*USER, {"role": "assistant", "content": "Paris.", "reasoning_content": THOUGHT}]
    messages.append({"role": "user", "content": "Thanks"})
    [choice] = client.chat.completions.create(model="fake-model", messages=messages).choices
    assert choice.message.content == "Fine." and getattr(choice.message, "reasoning_content", None) is None
    assert engine.tokenizer.last_chat["messages"][1]["reasoning_content"] == THOUGHT


def test_history_carries_vllms_reasoning_field_to_the_template(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    # vLLM renamed reasoning_content to `reasoning`; a history sent back under that name is the same.
    engine.reply = "Fine."
    messages = [*USER, {"role": "assistant", "content": "Paris.", "reasoning": THOUGHT}]
    messages.append({"role": "user", "content": "Thanks"})
    body = {"model": "fake-model", "messages": messages}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert engine.tokenizer.last_chat["messages"][1]["reasoning_content"] == THOUGHT
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi", "reasoning": "x"}]}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[0].reasoning"


def test_only_assistant_messages_carry_thinking(server: BackgroundServer) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi", "reasoning_content": "x"}]}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[0].reasoning_content"


def test_a_template_that_does_not_think_leaves_the_output_alone() -> None:
    # The fake has no chat template of its own, so `auto` finds no thinking markers in it.
    with BackgroundServer(FakeEngine(reply=REPLY, max_model_len=4096)) as running:
        [choice] = (
            openai_client(running.base_url).chat.completions.create(model="fake-model", messages=USER).choices
        )
    assert choice.message.content == REPLY
    assert getattr(choice.message, "reasoning_content", None) is None


def test_a_forced_call_after_the_thinking(client: Any, engine: FakeEngine) -> None:
    call = f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>'
    engine.reply = f"<think>{THOUGHT}</think>\n{call}"
    named = {"type": "function", "function": {"name": "get_weather"}}
    for stream in (False, True):
        response = client.chat.completions.create(
            model="fake-model", messages=USER, tools=TOOLS, tool_choice=named, stream=stream
        )
        if stream:
            deltas = [c.choices[0].delta for c in response if c.choices]
            reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
            arguments = "".join(c.function.arguments or "" for d in deltas for c in d.tool_calls or [])
        else:
            message = response.choices[0].message
            reasoning, arguments = message.reasoning_content, message.tool_calls[0].function.arguments
        assert reasoning == THOUGHT and json.loads(arguments) == json.loads(PARIS)
    assert engine.calls[-1].params.structured_outputs.preamble is not None


def test_a_thinking_the_client_began_goes_on_as_thinking(client: Any, engine: FakeEngine) -> None:
    # continue_final_message on an assistant message that opens a block: the model writes the rest
    # of the thinking, then closes it and answers (the prompt's last tokens alone do not show it).
    engine.reply = " wants the capital of France.\n</think>\n\nIt is Paris."
    begun = {"role": "assistant", "content": "<think>\nThe user asks where the government sits: the user"}
    extra = {"continue_final_message": True, "add_generation_prompt": False}
    messages = [*USER, begun]
    [choice] = client.chat.completions.create(model="fake-model", messages=messages, extra_body=extra).choices
    assert choice.message.reasoning_content == "wants the capital of France."
    assert choice.message.content == "It is Paris."
    stream = client.chat.completions.create(
        model="fake-model", messages=messages, extra_body=extra, stream=True
    )
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert (
        "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "wants the capital of France."
    )
    assert "".join(d.content or "" for d in deltas) == "It is Paris."
    # Under a constraint the block must close before the answer, as when the prompt opened it.
    engine.reply = ' France.</think>{"city": "Paris"}'
    response_format = {"type": "json_object"}
    [choice] = client.chat.completions.create(
        model="fake-model", messages=messages, extra_body=extra, response_format=response_format
    ).choices
    assert json.loads(choice.message.content) == {"city": "Paris"}
    constraint = engine.calls[-1].params.structured_outputs
    assert constraint is not None and constraint.preamble is not None
    assert constraint.preamble.startswith('preamble: free "</think>"')
    # A block the message closes leaves the output all answer.
    engine.reply = "It is Paris."
    closed = {"role": "assistant", "content": "<think>\n\n</think>\n\n"}
    [choice] = client.chat.completions.create(
        model="fake-model", messages=[*USER, closed], extra_body=extra
    ).choices
    assert choice.message.content == "It is Paris."
    assert getattr(choice.message, "reasoning_content", None) is None
