"""gpt-oss's harmony replies through the chat API, on harmony_harness's tokenizer and template, and the
`auto` parsers that find the markup in it. Thinking, content and calls, streamed and not; the effort,
the tools and the history as the template gets them; constraints and forced calls held by the grammar
of the whole output in harmony markup."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from batchlm.server.background import BackgroundServer
from batchlm.tokenizer.tokenizer import Tokenizer
from fake_engine import FakeEngine, openai_client
from harmony_harness import (
    ANALYSIS,
    ANSWER,
    ARGUMENTS,
    CALL_ALONE,
    CALLING,
    THOUGHT,
    grammar_of,
    harmony_engine,
    prompt,
)
from tools_harness import TOOLS, USER


@pytest.fixture(scope="module")
def engine(tiny_tokenizer: Tokenizer) -> FakeEngine:
    return harmony_engine(tiny_tokenizer)


@pytest.fixture(scope="module")
def server(engine: FakeEngine) -> Iterator[BackgroundServer]:
    with BackgroundServer(engine) as running:
        yield running


def streamed(client: Any, **request: Any) -> tuple[str, str, dict[int, list[str]], str | None]:
    chunks = client.chat.completions.create(model="fake-model", messages=USER, stream=True, **request)
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, ["", ""])
                entry[0] += call.function.name or ""
                entry[1] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return reasoning, content, calls, finish


def test_the_thinking_and_the_answer(server: BackgroundServer, engine: FakeEngine) -> None:
    engine.reply = ANSWER
    client = openai_client(server.base_url)
    [choice] = client.chat.completions.create(model="fake-model", messages=USER).choices
    assert choice.message.reasoning_content == THOUGHT
    assert choice.message.content == "It is sunny in Paris."
    assert choice.finish_reason == "stop"
    # The markers are special tokens: the text keeps them, or nothing could be read.
    assert engine.calls[-1].params.skip_special_tokens is False
    assert streamed(client) == (THOUGHT, "It is sunny in Paris.", {}, "stop")


def test_a_call_after_a_preamble(server: BackgroundServer, engine: FakeEngine) -> None:
    engine.reply = CALLING
    client = openai_client(server.base_url)
    [choice] = client.chat.completions.create(model="fake-model", messages=USER, tools=TOOLS).choices
    assert (choice.message.reasoning_content, choice.message.content) == (THOUGHT, "Let me look.")
    [call] = choice.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", ARGUMENTS)
    assert choice.finish_reason == "tool_calls"
    # get_time has no description: gpt-oss's template would fail on it, so it gets an empty one.
    assert "# Tools get_weather: Weather now get_time: <|end|>" in prompt(engine)
    calls = {0: ["get_weather", ARGUMENTS]}
    assert streamed(client, tools=TOOLS) == (THOUGHT, "Let me look.", calls, "tool_calls")


def test_a_call_cut_short_finishes_with_length(server: BackgroundServer, engine: FakeEngine) -> None:
    engine.reply = CALLING
    client = openai_client(server.base_url)
    budget = len(engine.tokenizer.encode(CALLING, add_special_tokens=False)) - 2
    [choice] = client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, max_tokens=budget
    ).choices
    assert choice.finish_reason == "length" and choice.message.content == "Let me look."
    [call] = choice.message.tool_calls
    assert ARGUMENTS.startswith(call.function.arguments) and call.function.arguments != ARGUMENTS
    _, content, calls, finish = streamed(client, tools=TOOLS, max_tokens=budget)
    assert (content, calls[0][1], finish) == ("Let me look.", call.function.arguments, "length")


@pytest.mark.parametrize(("effort", "written"), [("high", "high"), ("minimal", "low"), ("none", "low")])
def test_the_effort_reaches_the_template(
    server: BackgroundServer, engine: FakeEngine, effort: str, written: str
) -> None:
    """gpt-oss cannot switch its thinking off: "none" and "minimal" ask for its least."""
    engine.reply = ANSWER
    openai_client(server.base_url).chat.completions.create(
        model="fake-model", messages=USER, reasoning_effort=effort
    )
    assert f"Reasoning: {written}<|end|>" in prompt(engine)


def test_the_history_s_thinking_and_calls_reach_the_template(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    engine.reply = ANSWER
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
    history = [
        *USER,
        {"role": "assistant", "content": None, "reasoning_content": THOUGHT, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    openai_client(server.base_url).chat.completions.create(model="fake-model", messages=history, tools=TOOLS)
    rendered = prompt(engine)
    assert f"<|start|>assistant<|channel|>analysis<|message|>{THOUGHT}<|end|>" in rendered
    assert f"to=functions.get_weather<|channel|>commentary json<|message|>{ARGUMENTS}<|call|>" in rendered


def test_strict_functions_and_an_answer_beside_tools_get_the_harmony_grammar(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    """The Agents SDK's function tools are strict: their calls are held to a grammar in harmony markup,
    the thinking inside it."""
    engine.reply = CALLING
    client = openai_client(server.base_url)
    strict = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}, TOOLS[1]]
    [choice] = client.chat.completions.create(model="fake-model", messages=USER, tools=strict).choices
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    assert choice.finish_reason == "tool_calls"
    grammar = grammar_of(engine)
    assert '"analysis"' in grammar and '" to=functions.get_time"' in grammar
    engine.reply = f'{ANALYSIS}<|channel|>final<|message|>{{"w": 1}}'
    schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}
    [answer] = client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, response_format=schema
    ).choices
    assert (answer.message.reasoning_content, answer.message.content) == (THOUGHT, '{"w": 1}')
    assert '"final"' in grammar_of(engine)


def test_a_response_format_without_tools_holds_the_final_message(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    engine.reply = f'{ANALYSIS}<|channel|>final<|message|>{{"w": 1}}'
    schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}
    client = openai_client(server.base_url)
    client.chat.completions.create(model="fake-model", messages=USER, response_format=schema)
    constraint = engine.calls[-1].params.structured_outputs
    assert constraint is not None and constraint.json is not None
    assert constraint.preamble is not None and '"final"' in constraint.preamble


@pytest.mark.parametrize(
    "tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"]
)
def test_a_forced_call_is_written_in_harmony_markup(
    server: BackgroundServer, engine: FakeEngine, tool_choice: Any
) -> None:
    """The thinking, then the call as gpt-oss writes one (not JSON in the final message): read back as
    a call that finishes with tool_calls."""
    engine.reply = CALL_ALONE
    client = openai_client(server.base_url)
    [answer] = client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, tool_choice=tool_choice
    ).choices
    assert answer.message.reasoning_content == THOUGHT and answer.message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in answer.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert answer.finish_reason == "tool_calls"
    grammar = grammar_of(engine)
    # A named function is the only one the call may be of.
    assert ("to=functions.get_time" in grammar) is (tool_choice == "required")
    calls = {0: ["get_weather", ARGUMENTS]}
    assert streamed(client, tools=TOOLS, tool_choice=tool_choice) == (THOUGHT, "", calls, "tool_calls")
