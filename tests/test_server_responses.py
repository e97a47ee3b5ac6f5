"""POST /v1/responses (OpenAI's Responses API) through the official openai client, its stream helper
included, against a live server on a fake engine: text, thinking, tool calls, JSON under a schema, the
conversation read back from output items, and 400s naming the Responses fields."""

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
from batchlm.server.protocol_responses import ResponsesRequest
from batchlm.server.responses_input import chat_form
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine, FakeTokenizer, openai_client, wait_until
from tools_harness import HERMES_REPLY, PARIS, TOOLS

REPLY = "Hello from the fake engine."
THOUGHT = "The user wants Paris.\nSo: Paris."
THINKING_REPLY = f"<think>\n{THOUGHT}\n</think>\n\nIt is Paris."
# The chat tools, as the Responses API declares them (flat).
FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096, cached_tokens=3)


@pytest.fixture(scope="module")
def server_settings() -> ServerSettings:
    return ServerSettings(reasoning_parser="think")


def post(server: BackgroundServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/responses", json={"input": "hi", **body}, timeout=30)


def events_of(server: BackgroundServer, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, payload) of a raw stream, with every line checked to be SSE."""
    events = []
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        text = response.read().decode()
    for block in text.split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        payload = json.loads(data_line.removeprefix("data: "))
        # Every event is its payload's compact JSON, key order included (delta events are framed).
        assert data_line == "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        events.append((name_line.removeprefix("event: "), payload))
    assert text.endswith("\n\n") and "[DONE]" not in text
    return events


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


def test_a_stream_gives_what_the_response_gives(
    client: Any, server: BackgroundServer, engine: FakeEngine
) -> None:
    engine.reply = REPLY
    with client.responses.stream(model="fake-model", input="hi") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == REPLY and len(deltas) > 1
    assert final.output_text == REPLY and final.status == "completed"
    assert final.usage.output_tokens == len(REPLY)
    events = events_of(server, {"input": "hi"})
    names = [name for name, _ in events]
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [payload["sequence_number"] for _, payload in events] == list(range(len(events)))
    assert all(payload["type"] == name for name, payload in events)
    ids = {payload["item_id"] for _, payload in events if "item_id" in payload}
    assert len(ids) == 1 and events[0][1]["response"]["status"] == "in_progress"


def test_streamed_text_that_json_escapes_arrives_whole(server: BackgroundServer, engine: FakeEngine) -> None:
    engine.reply = 'Ünïcødé "quoted" \\ back\nslash\t\u2028 😀 </tool_call>'
    events = events_of(server, {"input": "hi"})
    assert "".join(p["delta"] for name, p in events if name == "response.output_text.delta") == engine.reply
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == engine.reply


def test_a_stream_cut_short_ends_incomplete(server: BackgroundServer, engine: FakeEngine) -> None:
    engine.reply = REPLY
    events = events_of(server, {"input": "hi", "max_output_tokens": 4})
    name, last = events[-1]
    assert name == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["status"] == "incomplete"
    assert last["response"]["output"][0]["content"][0]["text"] == REPLY[:4]


def test_logprobs_come_with_the_include_streamed_and_not(client: Any, engine: FakeEngine) -> None:
    engine.reply = REPLY
    include = ["message.output_text.logprobs"]
    plain = client.responses.create(model="fake-model", input="hi", top_logprobs=2)
    assert plain.output[0].content[0].logprobs == [], "top_logprobs alone asks for none, as in OpenAI's API"
    assert engine.calls[-1].params.logprobs is None
    whole = client.responses.create(model="fake-model", input="hi", top_logprobs=2, include=include)
    logprobs = whole.output[0].content[0].logprobs
    assert [entry.token for entry in logprobs] == list(REPLY)
    assert all(len(entry.top_logprobs) == 2 and entry.bytes for entry in logprobs)
    assert logprobs[0].logprob == pytest.approx(-0.25)
    with client.responses.stream(model="fake-model", input="hi", top_logprobs=2, include=include) as stream:
        events = list(stream)
    streamed = [entry for e in events if e.type == "response.output_text.delta" for entry in e.logprobs]
    assert [entry.token for entry in streamed] == list(REPLY)
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert [entry.token for entry in done.logprobs] == list(REPLY)
    # Without thinking held back, each delta carries its own token's.
    assert all(len(e.logprobs) == 1 for e in events if e.type == "response.output_text.delta")


def test_logprobs_of_held_back_text_ride_on_the_next_delta(client: Any, engine: FakeEngine) -> None:
    engine.reply = THINKING_REPLY
    include = ["message.output_text.logprobs"]
    with client.responses.stream(model="fake-model", input="hi", include=include) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas[0].logprobs) > 1, "the thinking's tokens come with the answer's first delta"
    assert sum(len(e.logprobs) for e in deltas) == len(THINKING_REPLY) == final.usage.output_tokens
    whole = client.responses.create(model="fake-model", input="hi", include=include)
    assert len(whole.output[-1].content[0].logprobs) == len(THINKING_REPLY)


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


def test_a_streamed_call_arrives_as_argument_deltas(
    client: Any, server: BackgroundServer, engine: FakeEngine
) -> None:
    engine.reply = HERMES_REPLY
    with client.responses.stream(model="fake-model", input="Weather?", tools=FLAT_TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_response()
    fragments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(fragments) == done.arguments and json.loads(done.arguments) == json.loads(PARIS)
    assert "tool_call" not in "".join(e.delta for e in events if e.type == "response.output_text.delta")
    [call] = [item for item in final.output if item.type == "function_call"]
    assert call.arguments == done.arguments and call.name == "get_weather"
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [item.type for item in added] == ["message", "function_call"]
    assert added[1].call_id == call.call_id and added[1].arguments == ""


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


def test_output_items_sent_back_are_the_chat_conversation(
    client: Any, server: BackgroundServer, engine: FakeEngine
) -> None:
    engine.reply = THINKING_REPLY.replace("It is Paris.", HERMES_REPLY)
    first = client.responses.create(model="fake-model", input="Weather in Paris?", tools=FLAT_TOOLS)
    reasoning, _, call = first.output
    history = [item.model_dump(exclude_none=True) for item in first.output]
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    engine.reply = "Sunny."
    client.responses.create(
        model="fake-model",
        input=[{"role": "user", "content": "Weather in Paris?"}, *history, answer],
        tools=FLAT_TOOLS,
    )
    read_back = engine.tokenizer.last_chat["messages"]
    chat_call = {
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    chat_messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [chat_call],
            "reasoning_content": THOUGHT,
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"},
    ]
    body = {"messages": chat_messages, "tools": TOOLS}
    assert httpx.post(f"{server.base_url}/v1/chat/completions", json=body).status_code == 200
    assert read_back == engine.tokenizer.last_chat["messages"]
    # The template reads the thinking (this one has no tool support, so the calls come as text).
    form = chat_form(
        ResponsesRequest(input=[{"role": "user", "content": "Weather in Paris?"}, *history, answer])
    )
    assert [m.model_dump(exclude_none=True) for m in form.request.messages] == chat_messages
    assert chat_messages[1]["reasoning_content"] == reasoning.content[0].text
    assert form.origins == ["input[0]", "input[1]", "input[4]"]


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


def test_thinking_after_text_or_calls_starts_the_next_assistant_turn() -> None:
    # Thinking after a turn's text or calls is the next turn's: each turn keeps its own (it used to be
    # joined to the turn before, and the texts of both turns ran together).
    call = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
    items = [
        {"role": "user", "content": "a"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "first"}]},
        call,
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "second"}]},
        {"role": "assistant", "content": "ok"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "third"}]},
        {"role": "assistant", "content": "done"},
    ]
    messages = [
        m.model_dump(exclude_none=True) for m in chat_form(ResponsesRequest(input=items)).request.messages
    ]
    assert [(m.get("reasoning_content"), m.get("content")) for m in messages[1:]] == [
        ("first", None),
        ("second", "ok"),
        ("third", "done"),
    ]


def test_text_after_calls_is_their_turns_text_and_their_outputs_follow_them() -> None:
    # A reply that wrote text after its call is laid out as [message, function_call, message]; read
    # back it is one turn, as chat's reply gives it, so the tool output follows the turn with the call
    # it answers (it used to follow a second assistant turn holding the text).
    call = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
    items = [
        {"role": "user", "content": "a"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "think"}]},
        {"role": "assistant", "content": "Hi"},
        call,
        {"role": "assistant", "content": " there"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    form = chat_form(ResponsesRequest(input=items, instructions="sys"))
    messages = [m.model_dump(exclude_none=True) for m in form.request.messages]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[2] == {
        "role": "assistant",
        "content": "Hi there",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        "reasoning_content": "think",
    }
    assert messages[3] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    assert form.origins == ["instructions", "input[0]", "input[1]", "input[5]"]
    assert form.rename("messages[2].tool_calls: bad") == "input[1].tool_calls: bad"


def test_message_parts_and_roles_are_read_as_chat_messages(client: Any, engine: FakeEngine) -> None:
    engine.reply = REPLY
    client.responses.create(
        model="fake-model",
        input=[
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Rules."}]},
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
            },
            {"role": "assistant", "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
            {"role": "user", "content": "c"},
        ],
    )
    assert engine.tokenizer.last_chat["messages"] == [
        {"role": "system", "content": "Rules."},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "c"},
    ]


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"input": []}, "input", "at least one item"),
        ({"previous_response_id": "resp_1"}, "previous_response_id", "not found"),
        ({"previous_response_id": "../../etc/passwd"}, "previous_response_id", "not found"),
        ({"conversation": "conv_1"}, "conversation", "previous_response_id"),
        ({"background": True}, "background", "not supported"),
        ({"top_logprobs": 21}, "top_logprobs", "20"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options", "'stream'"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "input[0].content[0].type",
            "text only",
        ),
        (
            {"input": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
            "input[1].role",
            "invalid role",
        ),
        # An item_reference names a stored item (tests/test_server_responses_items.py).
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].id", "Item with id 'x' not found."),
        ({"input": [{"type": "item_reference"}]}, "input[0].id", "must be a string"),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type", "not supported"),
        (
            {"input": [{"type": "custom_tool_call", "call_id": "c", "name": "f", "input": "x"}]},
            "input[0].type",
            "only 'function' tools",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "", "output": "r"}]},
            "input[0].call_id",
            "must not be empty",
        ),
        # Parts and messages missing what makes them one: named as missing, not as of type None.
        ({"input": [{"role": "user", "content": [{"text": "x"}]}]}, "input[0].content[0].type", "Missing"),
        ({"input": [{"role": "user", "content": ["x"]}]}, "input[0].content[0]", "must be an object"),
        ({"input": [{"type": "message", "content": "x"}]}, "input[0].role", "Missing required"),
        # Chat's text part: the Responses API's are named (a text part is not "not text").
        (
            {"input": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
            "input[0].content[0].type",
            "'input_text'",
        ),
        (
            {"input": [{"role": "assistant", "content": [{"type": "refusal", "refusal": None}]}]},
            "input[0].content[0].refusal",
            "string",
        ),
        # Not objects: the item at fault is named, not the string `input` may also be.
        ({"input": [{"role": "user", "content": "a"}, "b"]}, "input[1]", "must be an object"),
        ({"input": [None]}, "input[0]", "must be an object"),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
            "string",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]},
            "input[0].output",
            "string",
        ),
        # A reasoning item's summary and content are lists of typed parts: a plain string (or a part
        # of another type) is refused, naming the field, rather than read as no thinking.
        (
            {"input": [{"type": "reasoning", "summary": "I thought"}]},
            "input[0].summary",
            "must be a list of {'type': 'summary_text', 'text': <string>} parts",
        ),
        (
            {"input": [{"type": "reasoning", "summary": [], "content": [{"type": "text", "text": "x"}]}]},
            "input[0].content[0]",
            "{'type': 'reasoning_text', 'text': <string>}",
        ),
        ({"input": [{"type": "reasoning", "summary": ["x"]}]}, "input[0].summary[0]", "'summary_text'"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "only 'function'"),
        ({"tools": [{"type": "function", "name": "f", "bogus": 1}]}, "tools[0].bogus", "Extra inputs"),
        (
            {"tools": [{"type": "function", "name": "f", "defer_loading": True}]},
            "tools[0].defer_loading",
            "tool search",
        ),
        (
            {"tools": [{"type": "function", "name": "f", "allowed_callers": ["programmatic"]}]},
            "tools[0].allowed_callers",
            "directly",
        ),
        (
            {"tools": [{"type": "function", "name": "f", "async": True}]},
            "tools[0].async",
            "function_call_output",
        ),
        (
            {"tools": [{"type": "function", "name": "f", "output_schema": {"type": "object"}}]},
            "tools[0].output_schema",
            "not supported",
        ),
        ({"tools": FLAT_TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "nope"),
        ({"tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice", "'required'"),
        ({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
        (
            {"text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "nope"}}}},
            "text.format",
            "schema",
        ),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort", "xhigh"),
        ({"unknown_field": 1}, "unknown_field", "Unrecognized"),
        ({"temperature": -1}, "temperature", "temperature"),
        ({"moderation": {"model": "omni-moderation-latest"}}, "moderation", "no moderation model"),
        # OpenAI fields the openai client declares (frameworks' model settings send the first):
        # named as not served, not as unrecognized.
        (
            {"context_management": [{"type": "compaction", "compact_threshold": 200000}]},
            "context_management",
            "'truncation': 'auto'",
        ),
        ({"background_options": {"completion_window": "2h"}}, "background_options", "background responses"),
        ({"access_programs": {"cyber": "standard"}}, "access_programs", "not supported by this server"),
        ({"prompt_cache_options": {"mode": "sometimes"}}, "prompt_cache_options.mode", "mode"),
    ],
)
def test_bad_requests_are_400s_naming_the_responses_field(
    server: BackgroundServer, body: dict[str, Any], param: str, says: str
) -> None:
    response = post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert says in error["message"]
    assert "messages" not in error["message"] and "max_completion_tokens" not in error["message"]


def test_hints_with_nothing_to_act_on_are_accepted(client: Any, engine: FakeEngine) -> None:
    engine.reply = REPLY
    response = client.responses.create(
        model="fake-model",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "hi", "prompt_cache_breakpoint": {"mode": "explicit"}}
                ],
            }
        ],
        safety_identifier="someone",
        prompt_cache_key="conversation-1",
        prompt_cache_retention="24h",
        prompt_cache_options={"mode": "explicit", "ttl": "30m"},
        text={"verbosity": "low"},
        # No image reaches the model, so there is none to compress.
        extra_body={"image": {"context_compression": "auto"}},
    )
    assert response.output_text == REPLY
    assert engine.tokenizer.last_chat["messages"] == [{"role": "user", "content": "hi"}]


def test_truncation_auto_drops_the_oldest_turns_until_the_conversation_fits(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    engine.reply = REPLY
    # Bytes are tokens here: the whole conversation overflows the 4,096-token context.
    turns = [
        {"role": "user", "content": "a" * 1500},
        {"role": "assistant", "content": "b" * 1500},
        {"role": "user", "content": "c" * 1500},
        {"role": "assistant", "content": "d" * 100},
        {"role": "user", "content": "e" * 100},
    ]
    body = {"input": turns, "instructions": "Be brief."}
    assert post(server, body).json()["error"]["code"] == "context_length_exceeded"
    reply = post(server, {**body, "truncation": "auto"})
    assert reply.status_code == 200 and reply.json()["truncation"] == "auto"
    kept = engine.tokenizer.last_chat["messages"]
    assert [m["content"][0] for m in kept] == ["B", "c", "d", "e"], "the instructions stay"
    # The last item alone does not fit: nothing can be dropped to make it.
    error = post(server, {"input": "x" * 5000, "truncation": "auto"}).json()["error"]
    assert (error["param"], error["code"]) == ("input", "context_length_exceeded")


def test_truncation_auto_cuts_an_agent_s_session_between_its_calls(
    server: BackgroundServer, engine: FakeEngine
) -> None:
    engine.reply = REPLY
    items: list[dict[str, Any]] = [{"role": "user", "content": "Read the files."}]
    for n in range(4):
        call = {"type": "function_call", "call_id": f"c{n}", "name": "read", "arguments": "{}"}
        items += [call, {"type": "function_call_output", "call_id": f"c{n}", "output": str(n) * 1200}]
    reply = post(server, {"input": items, "tools": FLAT_TOOLS, "truncation": "auto"})
    assert reply.status_code == 200, reply.text
    kept = engine.tokenizer.last_chat["messages"]
    # It begins at the earliest call that lets the rest fit (calls and results as text for this template).
    roles = [m["role"] for m in kept if m["role"] != "system"]
    assert roles[0] == "assistant" and "<tool_call>" in kept[1]["content"]
    assert all("0" * 1200 not in str(m) for m in kept) and any("3" * 1200 in str(m) for m in kept)


def test_a_prompt_longer_than_the_context_names_input(server: BackgroundServer) -> None:
    error = post(server, {"input": "x" * 5000})
    assert error.status_code == 400 and error.json()["error"]["param"] == "input"


def test_reasoning_effort_without_a_reasoning_model_names_the_field() -> None:
    with BackgroundServer(FakeEngine()) as plain:  # its own engine: a server stops its engine at exit
        error = post(plain, {"reasoning": {"effort": "high"}}).json()["error"]
    assert error["param"] == "reasoning.effort" and "'reasoning.effort'" in error["message"]


def test_an_engine_failure_mid_stream_ends_with_error_and_failed_events() -> None:
    engine = FakeEngine(max_model_len=20_000, token_delay_s=0.01, reply="x" * 5000)
    with BackgroundServer(engine) as server:
        body = {"input": "hi", "stream": True}
        with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=30) as response:
            lines = response.iter_lines()
            for line in lines:
                if "response.output_text.delta" in line and line.startswith("data: "):
                    break
            engine.unexpected_error = RuntimeError("secret internals")
            rest = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
        error, failed = rest[-2:]
        assert (
            error["type"] == "error" and error["code"] == "server_error" and "secret" not in error["message"]
        )
        assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
        assert failed["response"]["error"]["code"] == "server_error"
        assert failed["sequence_number"] == error["sequence_number"] + 1


def test_a_client_leaving_a_stream_aborts_the_request() -> None:
    engine = FakeEngine(max_model_len=20_000, token_delay_s=0.01, reply="x" * 5000)
    with BackgroundServer(engine) as server:
        client = openai_client(server.base_url)
        with client.responses.stream(model="fake-model", input="hi") as stream:
            for event in stream:
                if event.type == "response.output_text.delta":
                    break
        wait_until(lambda: len(engine.aborted) == 1 and engine.running == 0, what="the abort")
        assert len(server.state.in_flight) == 0


def test_a_full_queue_is_openais_rate_limit_error() -> None:
    with BackgroundServer(FakeEngine(max_in_flight=0)) as server, pytest.raises(openai.RateLimitError):
        openai_client(server.base_url).responses.create(model="fake-model", input="hi")


def test_the_schema_of_the_route_is_documented(server: BackgroundServer) -> None:
    schema = httpx.get(f"{server.base_url}/openapi.json").json()
    assert "/v1/responses" in schema["paths"]
