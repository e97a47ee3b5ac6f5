"""POST /v1/responses (OpenAI's Responses API) through the official openai client against a live
server on a fake engine: the response's shape, usage and echoed settings, and its output items (text,
thinking, tool calls, calls that did not parse, JSON under a schema)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from batchlm.sampling_defaults import SamplingDefaults
from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine, FakeTokenizer, openai_client
from responses_harness import FLAT_TOOLS, REPLY, THINKING_REPLY, THOUGHT, events_of, post
from tools_harness import HERMES_REPLY, PARIS


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096, cached_tokens=3)


@pytest.fixture(scope="module")
def server_settings() -> ServerSettings:
    return ServerSettings(reasoning_parser="think")


def test_text_reply_has_the_response_shape_and_usage(client: Any, engine: FakeEngine) -> None:
    engine.reply = REPLY
    response = client.responses.create(model="fake-model", input="hi", instructions="Be brief.")
    assert response.id.startswith("resp_") and response.object == "response"
    assert (response.status, response.model, response.error, response.incomplete_details) == (
        "completed",
        "fake-model",
        None,
        None,
    )
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_") and message.content[0].type == "output_text"
    assert response.output_text == REPLY
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert engine.tokenizer.last_chat["messages"] == conversation
    prompt_tokens = len(FakeTokenizer().apply_chat_template(conversation))
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens) == (prompt_tokens, len(REPLY))
    assert usage.total_tokens == prompt_tokens + len(REPLY)
    assert usage.input_tokens_details.cached_tokens == 3
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert response.instructions == "Be brief." and response.store is True


def test_max_output_tokens_leaves_the_response_incomplete(client: Any, engine: FakeEngine) -> None:
    engine.reply = REPLY
    response = client.responses.create(model="fake-model", input="hi", max_output_tokens=5)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == REPLY[:5] and response.output[0].status == "incomplete"
    assert engine.calls[-1].params.max_tokens == 5 and response.max_output_tokens == 5


def test_the_sampling_settings_used_are_echoed_not_null() -> None:
    engine = FakeEngine()
    defaults = SamplingDefaults(temperature=0.6, top_p=0.9)
    engine.model_info = dataclasses.replace(engine.model_info, sampling_defaults=defaults)
    with BackgroundServer(engine) as server:
        recommended = post(server, {}).json()
        given = post(server, {"temperature": 0.2, "top_p": 0.5}).json()
        created = events_of(server, {"input": "hi", "temperature": 0.3})[0][1]["response"]
    assert (recommended["temperature"], recommended["top_p"]) == (0.6, 0.9)
    assert (given["temperature"], given["top_p"]) == (0.2, 0.5)
    assert (created["temperature"], created["top_p"]) == (0.3, 0.9)


def test_openai_s_defaults_are_echoed_for_a_plain_request(server: BackgroundServer) -> None:
    response = post(server, {}).json()
    assert (response["temperature"], response["top_p"]) == (1.0, 1.0)
    assert (response["tools"], response["tool_choice"], response["parallel_tool_calls"]) == ([], "auto", True)
    assert (response["text"], response["metadata"], response["truncation"]) == (
        {"format": {"type": "text"}},
        {},
        "disabled",
    )


def test_thinking_comes_as_a_reasoning_item(
    client: Any, server: BackgroundServer, engine: FakeEngine
) -> None:
    engine.reply = THINKING_REPLY
    response = client.responses.create(model="fake-model", input="hi")
    reasoning, _ = response.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    assert reasoning.content[0].text == THOUGHT and reasoning.summary == []
    assert response.output_text == "It is Paris."
    thinking = response.usage.output_tokens_details.reasoning_tokens
    chat = httpx.post(
        f"{server.base_url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    ).json()
    assert thinking == chat["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    events = events_of(server, {"input": "hi"})
    streamed = "".join(p["delta"] for name, p in events if name == "response.reasoning_text.delta")
    assert streamed == THOUGHT
    final = events[-1][1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == thinking


def test_reasoning_effort_reaches_the_template(client: Any, engine: FakeEngine) -> None:
    engine.reply = THINKING_REPLY
    client.responses.create(model="fake-model", input="hi", reasoning={"effort": "low"})
    assert engine.tokenizer.last_chat["kwargs"] == {"reasoning_effort": "low"}


def test_calls_come_as_function_call_items(client: Any, engine: FakeEngine) -> None:
    engine.reply = HERMES_REPLY
    response = client.responses.create(model="fake-model", input="Weather in Paris?", tools=FLAT_TOOLS)
    _, call = response.output
    assert response.output_text == "Let me look."
    assert call.type == "function_call" and call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert (call.name, json.loads(call.arguments), call.status) == (
        "get_weather",
        json.loads(PARIS),
        "completed",
    )
    assert response.tools[0].name == "get_weather" and response.tool_choice == "auto"
    assert engine.tokenizer.last_chat["messages"][-1] == {"role": "user", "content": "Weather in Paris?"}


def test_a_function_tool_s_own_fields_at_their_plain_values_are_taken(
    client: Any, engine: FakeEngine
) -> None:
    """The client's FunctionToolParam declares fields chat's functions lack (deferred loading, callers,
    asynchronous calls, an output schema): at the values of a plain function they are no error."""
    engine.reply = HERMES_REPLY
    plain = {"defer_loading": False, "allowed_callers": ["direct"], "async": False, "output_schema": None}
    tools = [{**FLAT_TOOLS[0], **plain, "strict": False}]
    response = client.responses.create(model="fake-model", input="Weather in Paris?", tools=tools)
    assert response.output[-1].type == "function_call" and response.output[-1].name == "get_weather"
    assert response.tools[0].defer_loading is False  # echoed as sent


def test_a_response_holds_the_items_its_stream_would(client: Any, engine: FakeEngine) -> None:
    engine.reply = f"Let me look.\n{HERMES_REPLY.removeprefix('Let me look.')}\nDone."
    whole = client.responses.create(model="fake-model", input="Weather?", tools=FLAT_TOOLS)
    with client.responses.stream(model="fake-model", input="Weather?", tools=FLAT_TOOLS) as stream:
        streamed = stream.get_final_response()
    assert [item.type for item in whole.output] == ["message", "function_call", "message"]
    assert [item.type for item in streamed.output] == [item.type for item in whole.output]
    assert whole.output_text == streamed.output_text == "Let me look.\n\nDone."


# Calls the model began and ended the output without finishing as calls: inside the call, and with
# arguments that stop parsing (both then read as text too, after the call item).
UNFINISHED_CALLS = {
    "ended-inside": 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
    "malformed": 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>',
}


@pytest.mark.parametrize("reply", UNFINISHED_CALLS.values(), ids=UNFINISHED_CALLS.keys())
@pytest.mark.parametrize("stream", [False, True])
def test_a_call_that_does_not_parse_is_an_incomplete_item(
    server: BackgroundServer, engine: FakeEngine, reply: str, stream: bool
) -> None:
    """The call item the model began stays (a stream announced it) but is "incomplete", as OpenAI marks
    an item the model did not finish, so that no client runs it as a call. The model ended the
    response, which is "completed": OpenAI's incomplete_details name only a response cut short."""
    engine.reply = reply
    body = {"input": "Weather?", "tools": FLAT_TOOLS}
    if stream:
        events = events_of(server, body)
        [done] = [
            p["item"]
            for name, p in events
            if name == "response.output_item.done" and p["item"]["type"] == "function_call"
        ]
        assert done["status"] == "incomplete"
        name, last = events[-1]
        assert name == "response.completed"
        response = last["response"]
    else:
        answer = post(server, body)
        assert answer.status_code == 200
        response = answer.json()
    [call] = [item for item in response["output"] if item["type"] == "function_call"]
    assert call["status"] == "incomplete" and call["name"] == "get_weather"
    assert (response["status"], response["incomplete_details"]) == ("completed", None)
    assert all(item["status"] == "completed" for item in response["output"] if item is not call)


def test_a_named_function_forces_its_call(client: Any, engine: FakeEngine) -> None:
    engine.reply = f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>'
    response = client.responses.create(
        model="fake-model",
        input="Weather?",
        tools=FLAT_TOOLS,
        tool_choice={"type": "function", "name": "get_weather"},
    )
    [call] = response.output
    assert call.name == "get_weather" and json.loads(call.arguments) == json.loads(PARIS)
    constraint = engine.calls[-1].params.structured_outputs
    assert constraint is not None and constraint.grammar is not None and '"get_weather"' in constraint.grammar
    assert (response.tool_choice.type, response.tool_choice.name) == ("function", "get_weather")


class City(BaseModel):
    city: str
    unit: str


def test_text_format_constrains_the_reply_and_parse_reads_it(client: Any, engine: FakeEngine) -> None:
    engine.reply = PARIS
    parsed = client.responses.parse(model="fake-model", input="Which city?", text_format=City)
    assert parsed.output_parsed == City(city="Paris", unit="celsius")
    constraint = engine.calls[-1].params.structured_outputs
    assert constraint is not None and json.loads(constraint.json or "")["properties"].keys() == {
        "city",
        "unit",
    }
    assert parsed.text.format.type == "json_schema"
    client.responses.create(model="fake-model", input="x", text={"format": {"type": "json_object"}})
    assert engine.calls[-1].params.structured_outputs.json_object


def test_a_full_queue_is_openais_rate_limit_error() -> None:
    with BackgroundServer(FakeEngine(max_in_flight=0)) as server, pytest.raises(openai.RateLimitError):
        openai_client(server.base_url).responses.create(model="fake-model", input="hi")


def test_the_schema_of_the_route_is_documented(server: BackgroundServer) -> None:
    schema = httpx.get(f"{server.base_url}/openapi.json").json()
    assert "/v1/responses" in schema["paths"]
