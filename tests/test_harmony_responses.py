"""gpt-oss's harmony replies through POST /v1/responses, on harmony_harness's tokenizer and template:
its thinking a reasoning item, its answer a message and its call a function_call, streamed as the
response gives them; the effort, and a conversation carried on (by previous_response_id, or sent back
whole as Codex does), as the template gets them; strict tools and tool_choice held by the grammar of
the whole output in harmony markup, as on the chat path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from batchlm.server.background import BackgroundServer
from batchlm.tokenizer.tokenizer import Tokenizer
from fake_engine import FakeEngine
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
from responses_harness import FLAT_TOOLS, check_order, events_of, post

QUESTION = "What is the weather in Paris?"
DELTAS = (
    "response.output_text.delta",
    "response.reasoning_text.delta",
    "response.function_call_arguments.delta",
)
SCHEMA_FORMAT = {"type": "json_schema", "name": "w", "schema": {"type": "object"}}


@pytest.fixture(scope="module")
def engine(tiny_tokenizer: Tokenizer) -> FakeEngine:
    return harmony_engine(tiny_tokenizer)


@pytest.fixture(scope="module")
def server(engine: FakeEngine) -> Iterator[BackgroundServer]:
    with BackgroundServer(engine) as running:
        yield running


def respond(server: BackgroundServer, **body: Any) -> dict[str, Any]:
    response = post(server, {"input": QUESTION, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


def shapes(output: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Each item's type, status and what it holds (a call: its name and arguments)."""
    shaped: list[tuple[str, ...]] = []
    for item in output:
        if item["type"] == "function_call":
            shaped.append(("function_call", item["status"], item["name"], item["arguments"]))
        else:
            [part] = item["content"]
            shaped.append((item["type"], item["status"], part["type"], part["text"]))
    return shaped


def without_ids(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in output]


def answered(server: BackgroundServer, **body: Any) -> list[dict[str, Any]]:
    """The output of the response to `body`, checked to be what its stream ends with: the stream's items
    in order, each item's deltas its whole text."""
    output = respond(server, **body)["output"]
    events = [payload for _, payload in events_of(server, {"input": QUESTION, **body})]
    check_order(events)
    final = events[-1]
    assert final["type"] == "response.completed"
    assert without_ids(final["response"]["output"]) == without_ids(output)
    for item in final["response"]["output"]:
        sent = "".join(e["delta"] for e in events if e["type"] in DELTAS and e["item_id"] == item["id"])
        assert sent == (item["arguments"] if item["type"] == "function_call" else item["content"][0]["text"])
    return list(output)


def test_the_thinking_is_a_reasoning_item_and_the_answer_a_message(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    engine.reply = ANSWER
    output = answered(server)
    assert shapes(output) == [
        ("reasoning", "completed", "reasoning_text", THOUGHT),
        ("message", "completed", "output_text", "It is sunny in Paris."),
    ]
    assert output[0]["summary"] == []
    # The markers are special tokens: the text keeps them, or nothing could be read.
    assert engine.calls[-1].params.skip_special_tokens is False


def test_a_call_after_a_preamble_is_a_function_call_item(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    engine.reply = CALLING
    assert shapes(answered(server, tools=FLAT_TOOLS)) == [
        ("reasoning", "completed", "reasoning_text", THOUGHT),
        ("message", "completed", "output_text", "Let me look."),
        ("function_call", "completed", "get_weather", ARGUMENTS),
    ]


@pytest.mark.parametrize(("effort", "written"), [("high", "high"), ("minimal", "low"), ("none", "low")])
def test_the_effort_reaches_the_template(
    server: BackgroundServer, engine: FakeEngine, effort: str, written: str
) -> None:
    """As on the chat path: gpt-oss cannot switch its thinking off, "none" and "minimal" ask for its least."""
    engine.reply = ANSWER
    respond(server, reasoning={"effort": effort})
    assert f"Reasoning: {written}<|end|>" in prompt(engine)


def test_a_call_s_turn_reaches_the_template_as_gpt_oss_renders_it(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    """The next turn after a call, continued by previous_response_id or sent back whole (the reasoning,
    preamble and function_call items, then the output, as Codex sends them): the same prompt, with the
    thinking as the template's `thinking` (the one analysis text of a turn with a call: the preamble
    left out) and the call with its output."""
    engine.reply = CALLING
    first = respond(server, tools=FLAT_TOOLS)
    [call] = [item for item in first["output"] if item["type"] == "function_call"]
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
    engine.reply = ANSWER
    respond(server, tools=FLAT_TOOLS, previous_response_id=first["id"], input=[result])
    continued = prompt(engine)
    user = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}
    respond(server, tools=FLAT_TOOLS, store=False, input=[user, *first["output"], result])
    assert prompt(engine) == continued
    assert continued.endswith(
        f"<|start|>user<|message|>{QUESTION}<|end|>"
        f"<|start|>assistant<|channel|>analysis<|message|>{THOUGHT}<|end|>"
        f"<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{ARGUMENTS}<|call|>"
        "<|start|>tool<|message|>sunny<|end|><|start|>assistant"
    )


def test_the_instructions_and_developer_items_are_one_message(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    """gpt-oss's template renders the first system message alone: Codex's `instructions` and the
    developer items its input begins with reach it as one."""
    engine.reply = ANSWER
    rules = {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rules."}]}
    respond(server, instructions="Base.", input=[rules, {"role": "user", "content": QUESTION}])
    assert f"<|end|><|start|>system<|message|>Base.\n\nRules.<|end|><|start|>user<|message|>{QUESTION}" in (
        prompt(engine)
    )


def test_parallel_calls_reach_the_template_one_a_message(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    """gpt-oss's template renders a message's first call alone and names the outputs after it by that
    call: calls made together are laid out one a message, each followed by its output."""
    engine.reply = ANSWER
    calls = [
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": ARGUMENTS},
        {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": '{"zone": "CET"}'},
    ]
    outputs = [
        {"type": "function_call_output", "call_id": c, "output": o}
        for c, o in (("c1", "sunny"), ("c2", "noon"))
    ]
    reasoning = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": THOUGHT}]}
    respond(
        server, tools=FLAT_TOOLS, input=[{"role": "user", "content": QUESTION}, reasoning, *calls, *outputs]
    )
    assert prompt(engine).endswith(
        f"<|start|>assistant<|channel|>analysis<|message|>{THOUGHT}<|end|>"
        f"<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{ARGUMENTS}<|call|>"
        "<|start|>tool<|message|>sunny<|end|>"
        '<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{"zone": "CET"}<|call|>'
        "<|start|>tool<|message|>noon<|end|><|start|>assistant"
    )


def test_a_tool_without_a_description_reaches_the_template(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    """The Responses API's tools may leave the description out (or send null): gpt-oss's template adds
    it to a string, so it gets an empty one rather than failing the request."""
    engine.reply = ANSWER
    tools = [FLAT_TOOLS[0], {**FLAT_TOOLS[1], "description": None}]
    for offered in (FLAT_TOOLS, tools):
        respond(server, tools=offered)
        assert "# Tools get_weather: Weather now get_time: <|end|>" in prompt(engine)


def test_strict_functions_and_a_format_beside_tools_get_the_harmony_grammar(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    """The Agents SDK's function tools are strict: their calls are held to the grammar in harmony markup
    that chat's are, the thinking inside it; so is a text.format beside tools."""
    engine.reply = CALLING
    strict = [{**FLAT_TOOLS[0], "strict": True}, FLAT_TOOLS[1]]
    [*_, call] = respond(server, tools=strict)["output"]
    assert (call["type"], call["name"], call["arguments"]) == ("function_call", "get_weather", ARGUMENTS)
    grammar = grammar_of(engine)
    assert '"analysis"' in grammar and '" to=functions.get_time"' in grammar
    engine.reply = f'{ANALYSIS}<|channel|>final<|message|>{{"w": 1}}'
    output = respond(server, tools=FLAT_TOOLS, text={"format": SCHEMA_FORMAT})["output"]
    assert [text for *_, text in shapes(output)] == [THOUGHT, '{"w": 1}']
    assert '"final"' in grammar_of(engine)


def test_a_format_without_tools_holds_the_final_message(server: BackgroundServer, engine: FakeEngine) -> None:
    engine.reply = f'{ANALYSIS}<|channel|>final<|message|>{{"w": 1}}'
    respond(server, text={"format": SCHEMA_FORMAT})
    constraint = engine.calls[-1].params.structured_outputs
    assert constraint is not None and constraint.json is not None
    assert constraint.preamble is not None and '"final"' in constraint.preamble


@pytest.mark.parametrize(
    "tool_choice",
    [
        {"type": "function", "name": "get_weather"},
        {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_weather"}]},
        "required",
    ],
    ids=["named", "allowed_tools", "required"],
)
def test_a_forced_call_is_written_in_harmony_markup(
    server: BackgroundServer, engine: FakeEngine, tool_choice: Any
) -> None:
    """The thinking, then the call as gpt-oss writes one (not JSON in a final message): a reasoning item
    and a function_call item, streamed and not."""
    engine.reply = CALL_ALONE
    assert shapes(answered(server, tools=FLAT_TOOLS, tool_choice=tool_choice)) == [
        ("reasoning", "completed", "reasoning_text", THOUGHT),
        ("function_call", "completed", "get_weather", ARGUMENTS),
    ]
    # Only "required" leaves the call free to be of either function.
    assert ("to=functions.get_time" in grammar_of(engine)) is (tool_choice == "required")
