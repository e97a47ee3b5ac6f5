"""Tool calling through the official openai client against a live server on a fake engine that replies
with a model's call markup (auto, and a forced tool_choice, decoded in that markup) or, on a server
without a call parser, with the JSON a forced tool_choice constrains the output to."""

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
from tools_harness import (
    HERMES_REPLY,
    MARKUP,
    PARIS,
    TOOLS,
    USER,
    WEATHER_PARAMETERS,
    post,
    prompt_of,
)


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


@pytest.fixture(scope="module")
def server(engine: FakeEngine) -> Iterator[BackgroundServer]:
    with BackgroundServer(engine) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Any:
    return openai_client(server.base_url)


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


def test_auto_returns_the_calls_the_model_wrote(client: Any, engine: FakeEngine) -> None:
    engine.reply = HERMES_REPLY
    response = client.chat.completions.create(model="fake-model", messages=USER, tools=TOOLS)
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert engine.calls[-1].params.structured_outputs is None
    # The fake's template knows no tools: they reach the model through the generic tools prompt.
    assert engine.tokenizer.last_chat["kwargs"]["tools"] == TOOLS
    assert "<tools>" in prompt_of(engine) and '"name": "get_weather"' in prompt_of(engine)


def test_a_reply_without_calls_is_plain_content(client: Any, engine: FakeEngine) -> None:
    engine.reply = "It is sunny in Paris <3"
    response = client.chat.completions.create(model="fake-model", messages=USER, tools=TOOLS)
    assert response.choices[0].message.content == "It is sunny in Paris <3"
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason == "stop"


def test_streaming_sends_openai_call_deltas_and_no_markup(client: Any, engine: FakeEngine) -> None:
    engine.reply = (
        HERMES_REPLY + '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    )
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, tools=TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Let me look."
    assert not any(marker in content for marker in MARKUP)
    pieces = [piece for c in chunks if c.choices for piece in c.choices[0].delta.tool_calls or ()]
    firsts = [p for p in pieces if p.id is not None]
    assert [(p.index, p.type, p.function.name, p.function.arguments) for p in firsts] == [
        (0, "function", "get_weather", ""),
        (1, "function", "get_time", ""),
    ]
    assert all(p.id.startswith("call_") for p in firsts)
    later = [p for p in pieces if p.id is None]
    assert all(p.type is None and p.function.name is None for p in later)
    arguments = ["".join(p.function.arguments for p in later if p.index == i) for i in (0, 1)]
    assert [json.loads(a) for a in arguments] == [{"city": "Paris", "unit": "celsius"}, {"zone": "CET"}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_helper_accumulates_the_calls(client: Any, engine: FakeEngine) -> None:
    engine.reply = HERMES_REPLY
    with client.chat.completions.stream(model="fake-model", messages=USER, tools=TOOLS) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    assert final.choices[0].finish_reason == "tool_calls"


def test_required_without_a_parser_decodes_under_a_schema_that_forces_a_call(
    plain_client: Any, plain_engine: FakeEngine
) -> None:
    plain_engine.reply = f'[{{"name": "get_weather", "parameters": {PARIS}}}, {{"name": "get_time", "parameters": {{"zone": "UTC"}}}}]'
    response = plain_client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, tool_choice="required"
    )
    calls = response.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"zone": "UTC"}),
    ]
    assert response.choices[0].message.content is None
    assert response.choices[0].finish_reason == "tool_calls"
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


def test_parse_gives_typed_arguments(plain_client: Any, plain_engine: FakeEngine) -> None:
    plain_engine.reply = PARIS
    tool = openai.pydantic_function_tool(Weather)
    response = plain_client.chat.completions.parse(
        model="fake-model",
        messages=USER,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "Weather"}},
    )
    [call] = response.choices[0].message.tool_calls
    assert call.function.parsed_arguments == Weather(city="Paris", unit="celsius")
    assert json.loads(plain_engine.calls[-1].params.structured_outputs.json) == tool["function"]["parameters"]


def test_tool_choice_none_parses_nothing_and_prompts_for_no_calls(client: Any, engine: FakeEngine) -> None:
    engine.reply = HERMES_REPLY
    response = client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, tool_choice="none"
    )
    assert response.choices[0].message.content == HERMES_REPLY
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason == "stop"
    assert engine.tokenizer.last_chat["kwargs"]["tools"] == TOOLS
    assert "<tools>" not in prompt_of(engine)


def sse_payloads(events: Any) -> list[dict[str, Any]]:
    return [json.loads(event.decode()[len("data: ") :]) for event in events]


def test_one_delta_holding_two_complete_calls_streams_both() -> None:
    from batchlm.outputs import CompletionOutput, RequestOutput
    from batchlm.reasoning.message import MessageReader
    from batchlm.server.protocol import ChatCompletionRequest
    from batchlm.server.serving_chat import ChatContext, ChatFormatter
    from batchlm.tools.use import chat_tool_use

    request = ChatCompletionRequest.model_validate({"messages": USER, "tools": TOOLS})
    context = ChatContext(
        request_id="chatcmpl-1", created=0, model="m", tokenizer=None, n=1, include_usage=False,
        top_logprobs=None, reader=MessageReader(None, chat_tool_use(request, "hermes", None).parser),
    )  # fmt: skip
    text = (
        f'<tool_call>{{"name": "get_weather", "arguments": {PARIS}}}</tool_call>'
        '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    )
    output = RequestOutput("r", None, [], [CompletionOutput(0, text, [1], finish_reason="stop")], True)
    chunks = sse_payloads(ChatFormatter(context).delta(0, output))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[:-1] == [
        {"tool_calls": [{"index": 0, "id": deltas[0]["tool_calls"][0]["id"], "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": PARIS}}]},
        {"tool_calls": [{"index": 1, "id": deltas[2]["tool_calls"][0]["id"], "type": "function",
                         "function": {"name": "get_time", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"zone": "CET"}'}}]},
    ]  # fmt: skip
    assert deltas[0]["tool_calls"][0]["id"] != deltas[2]["tool_calls"][0]["id"]
    assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_an_agent_loop_sends_the_reply_message_back(client: Any, engine: FakeEngine) -> None:
    engine.reply = HERMES_REPLY
    first = client.chat.completions.create(model="fake-model", messages=USER, tools=TOOLS)
    message = first.choices[0].message
    call = message.tool_calls[0]
    engine.reply = "It is 21 degrees."
    history = [*USER, message, {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"}]
    second = client.chat.completions.create(model="fake-model", messages=history, tools=TOOLS)
    assert second.choices[0].message.content == "It is 21 degrees."
    sent = engine.tokenizer.last_chat["messages"]
    assert sent[2]["content"].startswith("Let me look.\n<tool_call>")
    assert sent[3]["content"] == "<tool_response>\n21 degrees\n</tool_response>"


def test_streamed_logprobs_of_held_back_text_are_not_lost(client: Any, engine: FakeEngine) -> None:
    engine.reply = HERMES_REPLY
    chunks = list(
        client.chat.completions.create(
            model="fake-model",
            messages=USER,
            tools=TOOLS,
            stream=True,
            logprobs=True,
            stream_options={"include_usage": True},
        )
    )
    entries = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert len(entries) == chunks[-1].usage.completion_tokens == len(HERMES_REPLY.encode())


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


def test_auto_with_a_strict_function_holds_the_model_s_calls_to_its_schema(
    client: Any, engine: FakeEngine, server: BackgroundServer
) -> None:
    engine.reply = HERMES_REPLY
    strict = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}, TOOLS[1]]
    response = client.chat.completions.create(model="fake-model", messages=USER, tools=strict)
    calls = response.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", json.loads(PARIS))
    ]
    grammar = engine.calls[-1].params.structured_outputs.grammar
    assert grammar is not None and '"<tool_call>"' in grammar
    client.chat.completions.create(model="fake-model", messages=USER, tools=TOOLS)
    assert engine.calls[-1].params.structured_outputs is None, "no strict function: the model is free"
    broken = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {"type": "strin"}}}
    refused = post(server, {"model": "fake-model", "tools": [broken]})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "tools[0].function.parameters"


def test_with_a_response_format_the_model_may_still_call_a_tool(client: Any, engine: FakeEngine) -> None:
    """As in OpenAI's API (and agent frameworks with a typed final output): the answer follows the
    schema, or the model calls tools instead."""
    answer = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "final", "schema": answer}}
    fields = {"model": "fake-model", "messages": USER, "tools": TOOLS, "response_format": response_format}
    engine.reply = '{"answer": 42}'
    reply = client.chat.completions.create(**fields)
    assert reply.choices[0].message.content == '{"answer": 42}' and not reply.choices[0].message.tool_calls
    grammar = engine.calls[-1].params.structured_outputs.grammar
    assert grammar is not None and grammar.startswith("start: answer | ") and '"answer"' in grammar
    engine.reply = f'<tool_call>{{"name": "get_weather", "arguments": {PARIS}}}</tool_call>'
    reply = client.chat.completions.create(**fields)
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_weather"]
    assert reply.choices[0].finish_reason == "tool_calls"


def test_with_a_regex_or_choice_the_model_may_still_call_a_tool(client: Any, engine: FakeEngine) -> None:
    engine.reply = f'<tool_call>{{"name": "get_weather", "arguments": {PARIS}}}</tool_call>'
    for constraint, rule in [
        ({"regex": "[a-z]+"}, "answer: /[a-z]+/"),
        ({"choice": ["yes", "no"]}, 'answer: "yes" | "no"'),
    ]:
        reply = client.chat.completions.create(
            model="fake-model", messages=USER, tools=TOOLS, extra_body={"structured_outputs": constraint}
        )
        assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_weather"]
        grammar = engine.calls[-1].params.structured_outputs.grammar
        assert grammar.startswith("start: answer | ") and rule in grammar.splitlines()


def test_with_a_grammar_of_its_own_the_model_may_still_call_a_tool(
    client: Any, engine: FakeEngine, server: BackgroundServer
) -> None:
    """A Lark (or GBNF) grammar in structured_outputs takes the answer's place, a sub-grammar of the
    calls' grammar; one that does not compile is a 400 naming the field."""
    lark = 'start: "yes" | "no"'
    for reply in ("yes", f'<tool_call>{{"name": "get_weather", "arguments": {PARIS}}}</tool_call>'):
        engine.reply = reply
        answer = client.chat.completions.create(
            model="fake-model",
            messages=USER,
            tools=TOOLS,
            extra_body={"structured_outputs": {"grammar": lark}},
        )
        constraint = engine.calls[-1].params.structured_outputs
        assert constraint.grammar.startswith("start: answer | ") and "answer: @client" in constraint.grammar
        assert constraint.subgrammars == (("client", lark),)
    assert [c.function.name for c in answer.choices[0].message.tool_calls] == ["get_weather"]
    gbnf = 'root ::= "yes" | "no"'
    client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, extra_body={"structured_outputs": {"grammar": gbnf}}
    )
    assert engine.calls[-1].params.structured_outputs.subgrammars[0][0] == "client"
    refused = post(
        server, {"model": "fake-model", "tools": TOOLS, "structured_outputs": {"grammar": "start: nope"}}
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "structured_outputs"


def test_required_decodes_in_the_model_s_markup(client: Any, engine: FakeEngine, tiny_grammars: Any) -> None:
    """A forced call is written as the model's chat template shows calls (Hermes here), so the next
    turn's prompt repeats it as sampled; the grammar forces calls alone, of the offered functions,
    their arguments under each function's schema."""
    engine.reply = hermes_call("get_weather", PARIS) + "\n" + hermes_call("get_time", '{"zone": "UTC"}')
    response = client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, tool_choice="required"
    )
    calls = response.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"zone": "UTC"}),
    ]
    assert response.choices[0].message.content is None
    assert response.choices[0].finish_reason == "tool_calls"
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
    tool = openai.pydantic_function_tool(Weather)
    response = client.chat.completions.parse(
        model="fake-model",
        messages=USER,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "Weather"}},
    )
    [call] = response.choices[0].message.tool_calls
    assert call.function.parsed_arguments == Weather(city="Paris", unit="celsius")


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
