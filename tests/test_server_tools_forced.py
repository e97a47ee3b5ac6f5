"""Forced tool choices (`required`, a named function) through the official openai client against a live
server on a fake engine: decoded in the model's call markup under a grammar of it, or, on a server
without a call parser, as the plain JSON the forced choice constrains the output to."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from batchlm.sampling_params import StructuredOutputs
from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine, openai_client
from grammar_walk import takes, tiny_backend
from tools_harness import PARIS, TOOLS, USER, WEATHER_PARAMETERS, prompt_of, reply_of


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


@pytest.fixture(scope="module")
def client(engine: FakeEngine) -> Iterator[Any]:
    """The default parser (Hermes, for the fake engine's template): forced calls in its markup."""
    with BackgroundServer(engine) as running:
        yield openai_client(running.base_url)


@pytest.fixture(scope="module")
def plain_engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


@pytest.fixture(scope="module")
def plain_client(plain_engine: FakeEngine) -> Iterator[Any]:
    """A server without a call parser: a forced call is decoded as plain JSON (vLLM's form)."""
    with BackgroundServer(plain_engine, ServerSettings(tool_call_parser="none")) as running:
        yield openai_client(running.base_url)


@pytest.fixture(scope="module")
def tiny_grammars(tiny_tokenizer: Any) -> Any:
    """Whether a grammar takes a text, over the tiny tokenizer (the fake engine's bytes cannot be walked)."""
    backend = tiny_backend(tiny_tokenizer)

    def taken(grammar: str, text: str, then_ends: bool = True) -> bool:
        ids = tiny_tokenizer.hf.encode(text, add_special_tokens=False)
        return takes(backend, StructuredOutputs(grammar=grammar), ids, then_ends)

    return taken


def assert_weather_then_time_calls(response: Any) -> None:
    """The reply holds the two forced calls the fake engine wrote, and nothing else."""
    calls = response.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"zone": "UTC"}),
    ]
    assert response.choices[0].message.content is None
    assert response.choices[0].finish_reason == "tool_calls"


def hermes_call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def satisfies(value: Any, schema: dict[str, Any]) -> bool:
    """The few JSON-schema keywords the forced-call schemas use."""
    kinds = {"object": dict, "array": list, "string": str}
    if "type" in schema and not isinstance(value, kinds[schema["type"]]):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "anyOf" in schema and not any(satisfies(value, option) for option in schema["anyOf"]):
        return False
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return False
        return all(satisfies(item, schema.get("items", {})) for item in value)
    if isinstance(value, dict):
        if any(key not in value for key in schema.get("required", ())):
            return False
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False and not set(value) <= set(properties):
            return False
        return all(satisfies(v, properties[k]) for k, v in value.items() if k in properties)
    return True


def test_required_without_a_parser_decodes_under_a_schema_that_forces_a_call(
    plain_client: Any, plain_engine: FakeEngine
) -> None:
    plain_engine.reply = f'[{{"name": "get_weather", "parameters": {PARIS}}}, {{"name": "get_time", "parameters": {{"zone": "UTC"}}}}]'
    response = plain_client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, tool_choice="required"
    )
    assert_weather_then_time_calls(response)
    schema = json.loads(plain_engine.calls[-1].params.structured_outputs.json)
    assert satisfies(json.loads(plain_engine.reply), schema)
    assert "maxItems" not in schema
    assert not satisfies([], schema)
    assert not satisfies([{"name": "get_weather", "parameters": {"zone": "UTC"}}], schema)
    assert not satisfies([{"name": "launch", "parameters": {}}], schema)
    assert all(option["additionalProperties"] is False for option in schema["items"]["anyOf"])
    assert not satisfies([{"name": "get_time", "parameters": {"zone": "UTC", "extra": 1}}], schema)


def test_required_without_parallel_calls_allows_one(plain_client: Any, plain_engine: FakeEngine) -> None:
    plain_engine.reply = f'[{{"name": "get_weather", "parameters": {PARIS}}}]'
    response = plain_client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False
    )
    assert len(response.choices[0].message.tool_calls) == 1
    schema = json.loads(plain_engine.calls[-1].params.structured_outputs.json)
    assert schema["maxItems"] == 1 and satisfies(json.loads(plain_engine.reply), schema)


def test_a_named_function_without_a_parser_streams_its_arguments(
    plain_client: Any, plain_engine: FakeEngine
) -> None:
    plain_engine.reply = PARIS
    choice = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(
        plain_client.chat.completions.create(
            model="fake-model", messages=USER, tools=TOOLS, tool_choice=choice, stream=True
        )
    )
    schema = json.loads(plain_engine.calls[-1].params.structured_outputs.json)
    assert schema == {**WEATHER_PARAMETERS, "additionalProperties": False}
    pieces = [piece for c in chunks for piece in c.choices[0].delta.tool_calls or ()]
    assert pieces[0].function.name == "get_weather" and pieces[0].id.startswith("call_")
    assert "".join(p.function.arguments for p in pieces) == PARIS
    assert all(c.choices[0].delta.content in (None, "") for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


class Weather(BaseModel):
    city: str
    unit: str


def parse_weather(client: Any) -> None:
    """The openai client's `parse` with the Weather tool forced gives one call whose arguments parse
    into the Weather the fake engine wrote."""
    response = client.chat.completions.parse(
        model="fake-model",
        messages=USER,
        tools=[openai.pydantic_function_tool(Weather)],
        tool_choice={"type": "function", "function": {"name": "Weather"}},
    )
    [call] = response.choices[0].message.tool_calls
    assert call.function.parsed_arguments == Weather(city="Paris", unit="celsius")


def test_parse_gives_typed_arguments(plain_client: Any, plain_engine: FakeEngine) -> None:
    plain_engine.reply = PARIS
    parse_weather(plain_client)
    tool = openai.pydantic_function_tool(Weather)
    assert json.loads(plain_engine.calls[-1].params.structured_outputs.json) == tool["function"]["parameters"]


def test_a_function_without_parameters_is_forced_to_an_empty_object(
    plain_client: Any, plain_engine: FakeEngine
) -> None:
    plain_engine.reply = "{}"
    ping = {"type": "function", "function": {"name": "ping"}}
    choice = {"type": "function", "function": {"name": "ping"}}
    response = plain_client.chat.completions.create(
        model="fake-model", messages=USER, tools=[ping], tool_choice=choice
    )
    assert response.choices[0].message.tool_calls[0].function.arguments == "{}"
    schema = json.loads(plain_engine.calls[-1].params.structured_outputs.json)
    assert schema == {"type": "object", "properties": {}, "additionalProperties": False}
    assert plain_engine.tokenizer.last_chat["kwargs"]["tools"][0]["function"]["parameters"] == schema


def test_a_forced_call_cut_short_answers_as_its_stream_does(
    plain_client: Any, plain_engine: FakeEngine
) -> None:
    """max_tokens ends the second call mid-arguments: the reply carries both calls, the second as far as
    it got, with finish_reason "length", whether streamed or not."""
    cut = f'[{{"name": "get_weather", "parameters": {PARIS}}}, {{"name": "get_time", "parameters": {{"zo'
    plain_engine.reply = cut + 'ne": "UTC"}}]'
    fields = {"model": "fake-model", "messages": USER, "tools": TOOLS, "tool_choice": "required"}
    budget = len(cut.encode())  # the fake tokenizer: a token a byte
    response = plain_client.chat.completions.create(**fields, max_tokens=budget)
    choice = response.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert calls == [("get_weather", PARIS), ("get_time", '{"zo')]
    assert choice.message.content is None and choice.finish_reason == "length"
    chunks = list(plain_client.chat.completions.create(**fields, max_tokens=budget, stream=True))
    pieces = [piece for c in chunks for piece in c.choices[0].delta.tool_calls or ()]
    streamed: dict[int, list[str]] = {}
    for piece in pieces:
        if piece.id is not None:
            streamed[piece.index] = [piece.function.name, ""]
        streamed[piece.index][1] += piece.function.arguments or ""
    assert [tuple(streamed[i]) for i in sorted(streamed)] == calls
    assert chunks[-1].choices[0].finish_reason == "length"


def test_required_decodes_in_the_model_s_markup(client: Any, engine: FakeEngine, tiny_grammars: Any) -> None:
    """A forced call is written as the model's chat template shows calls (Hermes here), so the next
    turn's prompt repeats it as sampled; the grammar forces calls alone, of the offered functions,
    their arguments under each function's schema."""
    engine.reply = hermes_call("get_weather", PARIS) + "\n" + hermes_call("get_time", '{"zone": "UTC"}')
    response = client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, tool_choice="required"
    )
    assert_weather_then_time_calls(response)
    grammar = engine.calls[-1].params.structured_outputs.grammar
    assert tiny_grammars(grammar, engine.reply)
    assert not tiny_grammars(grammar, ""), "no call at all"
    assert not tiny_grammars(grammar, "Let me look.\n" + engine.reply, then_ends=False), "text first"
    assert not tiny_grammars(grammar, hermes_call("launch", "{}"), then_ends=False)
    assert not tiny_grammars(grammar, hermes_call("get_time", '{"zone": "UTC", "x": 1}'), then_ends=False)
    assert not tiny_grammars(grammar, hermes_call("get_weather", '{"unit": "celsius"}'), then_ends=False)
    # The reply message, sent back as history, renders as the model wrote it.
    history = [*USER, response.choices[0].message]
    engine.reply = "Done."
    client.chat.completions.create(model="fake-model", messages=history, tools=TOOLS)
    assert hermes_call("get_weather", PARIS) in prompt_of(engine)


def test_required_without_parallel_calls_writes_one_call(
    client: Any, engine: FakeEngine, tiny_grammars: Any
) -> None:
    engine.reply = hermes_call("get_weather", PARIS)
    response = client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False
    )
    assert len(response.choices[0].message.tool_calls) == 1
    grammar = engine.calls[-1].params.structured_outputs.grammar
    assert tiny_grammars(grammar, engine.reply)
    assert not tiny_grammars(grammar, engine.reply + hermes_call("get_time", '{"zone": "UTC"}'), False)


def test_a_named_function_streams_its_call_from_the_model_s_markup(
    client: Any, engine: FakeEngine, tiny_grammars: Any
) -> None:
    engine.reply = hermes_call("get_weather", PARIS)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(
        client.chat.completions.create(
            model="fake-model", messages=USER, tools=TOOLS, tool_choice=choice, stream=True
        )
    )
    pieces = [piece for c in chunks for piece in c.choices[0].delta.tool_calls or ()]
    assert pieces[0].function.name == "get_weather" and pieces[0].id.startswith("call_")
    assert {p.index for p in pieces} == {0}
    assert json.loads("".join(p.function.arguments for p in pieces)) == json.loads(PARIS)
    assert all(c.choices[0].delta.content in (None, "") for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    grammar = engine.calls[-1].params.structured_outputs.grammar
    assert tiny_grammars(grammar, engine.reply)
    assert not tiny_grammars(grammar, hermes_call("get_time", '{"zone": "UTC"}'), then_ends=False)
    assert not tiny_grammars(grammar, engine.reply + hermes_call("get_weather", PARIS), then_ends=False)


def test_parse_gives_typed_arguments_from_the_model_s_markup(client: Any, engine: FakeEngine) -> None:
    engine.reply = hermes_call("Weather", PARIS)
    parse_weather(client)


def test_a_forced_call_in_markup_cut_short_answers_as_its_stream_does(
    client: Any, engine: FakeEngine
) -> None:
    first = hermes_call("get_weather", PARIS)
    cut = first + '\n<tool_call>\n{"name": "get_time", "arguments": {"zo'
    engine.reply = cut + 'ne": "UTC"}}\n</tool_call>'
    fields = {"model": "fake-model", "messages": USER, "tools": TOOLS, "tool_choice": "required"}
    budget = len(cut.encode())  # the fake tokenizer: a token a byte
    response = client.chat.completions.create(**fields, max_tokens=budget)
    choice = response.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert calls == [("get_weather", PARIS), ("get_time", '{"zo')]
    assert choice.message.content is None and choice.finish_reason == "length"
    chunks = list(client.chat.completions.create(**fields, max_tokens=budget, stream=True))
    streamed: dict[int, list[str]] = {}
    for piece in (piece for c in chunks for piece in c.choices[0].delta.tool_calls or ()):
        if piece.id is not None:
            streamed[piece.index] = [piece.function.name, ""]
        streamed[piece.index][1] += piece.function.arguments or ""
    assert [tuple(streamed[i]) for i in sorted(streamed)] == calls
    assert all(c.choices[0].delta.content in (None, "") for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_do_not_cut_a_forced_call(client: Any, engine: FakeEngine, stream: bool) -> None:
    # A forced output is calls alone, which a stop string could only cut off: the engine gets none, so
    # the call is whole (OpenAI's stop sequences end text, not calls).
    engine.reply = hermes_call("get_weather", PARIS)
    content, calls, reason = reply_of(client, stream, tool_choice="required", stop=["}", "Paris"])
    assert engine.calls[-1].params.stop == []
    assert (content, calls, reason) == ("", [("get_weather", PARIS)], "tool_calls")
