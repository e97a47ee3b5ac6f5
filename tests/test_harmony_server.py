"""gpt-oss's harmony replies through the server: a real byte-level tokenizer whose harmony markers are
special tokens (decoding without special tokens would hide them), a chat template in harmony markup
written here, and `auto` parsers that find the markup in it. Thinking, content and calls, streamed and
not; the effort and the history as the template gets them; constraints it cannot hold refused."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from batchlm.server.background import BackgroundServer
from batchlm.tokenizer.tokenizer import Tokenizer
from batchlm.tools.harmony import MARKERS
from fake_engine import FakeEngine, openai_client
from tools_harness import TOOLS, USER

# A minimal template in harmony markup: the effort in the system message, an assistant's thinking as
# an analysis message and its calls with the recipient in the header, as gpt-oss's own does.
TEMPLATE = (
    "<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}"
    "{% if tools %}\n# Tools{% for t in tools %} {{ t.function.name }}{% endfor %}{% endif %}<|end|>"
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "{% if m.thinking is defined %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif %}"
    "{% for c in m.tool_calls or [] %}<|start|>assistant to=functions.{{ c.function.name }}"
    "<|channel|>commentary json<|message|>{{ c.function.arguments | tojson }}<|call|>{% endfor %}"
    "{% if m.content %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>{% endif %}"
    "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
THOUGHT = "The user wants the weather in Paris."
ANALYSIS = f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant"
ANSWER = f"{ANALYSIS}<|channel|>final<|message|>It is sunny in Paris."
ARGUMENTS = '{"city": "Paris"}'
# The preamble, then the call; <|call|> ends the generation and stays out of the text.
CALLING = (
    f"{ANALYSIS}<|channel|>commentary<|message|>Let me look.<|end|><|start|>assistant"
    f"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{ARGUMENTS}"
)


@pytest.fixture(scope="module")
def engine(tiny_tokenizer: Tokenizer) -> FakeEngine:
    hf = copy.deepcopy(tiny_tokenizer.hf)
    hf.add_tokens(list(MARKERS), special_tokens=True)
    stops = [hf.convert_tokens_to_ids("<|return|>"), hf.convert_tokens_to_ids("<|call|>")]
    return FakeEngine(tokenizer=Tokenizer(hf, stops, TEMPLATE), reply=ANSWER, max_model_len=4096)


@pytest.fixture(scope="module")
def server(engine: FakeEngine) -> Iterator[BackgroundServer]:
    with BackgroundServer(engine) as running:
        yield running


def prompt(engine: FakeEngine) -> str:
    return str(engine.tokenizer.decode(engine.calls[-1].prompt_token_ids, skip_special_tokens=False))


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
    assert "# Tools get_weather" in prompt(engine)
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


def test_constraints_without_a_grammar_are_refused(server: BackgroundServer, engine: FakeEngine) -> None:
    strict = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}]
    body = {"model": "fake-model", "messages": USER, "tools": strict}
    refused = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert refused.status_code == 400, refused.text
    assert "gpt-oss" in refused.json()["error"]["message"]
    schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}
    body = {"model": "fake-model", "messages": USER, "tools": TOOLS, "response_format": schema}
    refused = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format"


def test_a_forced_call_is_read_from_the_final_message(server: BackgroundServer, engine: FakeEngine) -> None:
    """A named function: its arguments' JSON after the thinking, in the final message."""
    engine.reply = f"{ANALYSIS}<|channel|>final<|message|>{ARGUMENTS}"
    choice = {"type": "function", "function": {"name": "get_weather"}}
    client = openai_client(server.base_url)
    [answer] = client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, tool_choice=choice
    ).choices
    assert answer.message.reasoning_content == THOUGHT
    assert [(c.function.name, json.loads(c.function.arguments)) for c in answer.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    constraint = engine.calls[-1].params.structured_outputs
    assert constraint is not None and constraint.preamble is not None and '"final"' in constraint.preamble
