"""What a chat request with tools may carry, through a live server on a fake engine: malformed tools,
tool choices and tool history are 400s naming the field; tool history reaches the chat template as a
template with tools expects it, or as text for one without; --tool-call-parser picks the parser."""

from __future__ import annotations

import json
from typing import Any, cast

import httpx
import openai
import pytest
from pydantic import BaseModel

from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine
from tools_harness import HERMES_REPLY, PARIS, TOOLS, USER, post, prompt_of


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


ENDLESS_FUNCTION = {
    "name": "nest",
    "parameters": {"type": "object", "properties": {"inner": {"$ref": "#"}}, "required": ["inner"]},
}


class Weather(BaseModel):
    city: str


HISTORY = [
    *USER,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
]


def test_tool_history_reaches_a_tool_aware_template(client: Any, engine: FakeEngine) -> None:
    engine.reply = "It is 21 degrees."
    engine.tokenizer.chat_template = "{% for tool in tools %}{{ tool }}{% endfor %}"
    try:
        response = client.chat.completions.create(model="fake-model", messages=HISTORY, tools=TOOLS)
    finally:
        del engine.tokenizer.chat_template
    assert response.choices[0].message.content == "It is 21 degrees."
    messages = engine.tokenizer.last_chat["messages"]
    assert messages[1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Paris", "unit": "celsius"},
    }
    assert messages[2] == {"role": "tool", "content": "21 degrees", "tool_call_id": "call_1"}
    assert len(messages) == 3  # no generic tools prompt for a template that renders tools itself


def test_a_call_cut_short_comes_back_as_the_text_it_was(client: Any, engine: FakeEngine) -> None:
    # max_tokens cut the call: an agent sends it back as it got it, and OpenAI takes any text there.
    cut = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"ci'}}]
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": cut}, HISTORY[2]]
    engine.reply = "Sorry."
    engine.tokenizer.chat_template = "{% for tool in tools %}{{ tool }}{% endfor %}"
    try:
        client.chat.completions.create(model="fake-model", messages=history, tools=TOOLS)
    finally:
        del engine.tokenizer.chat_template
    assert engine.tokenizer.last_chat["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"ci'
    client.chat.completions.create(model="fake-model", messages=history, tools=TOOLS)
    as_text = engine.tokenizer.last_chat["messages"][2]["content"]
    assert as_text == '<tool_call>\n{"name": "get_weather", "arguments": {"ci}\n</tool_call>'


def test_tool_history_becomes_text_for_a_template_without_tools(client: Any, engine: FakeEngine) -> None:
    engine.reply = "It is 21 degrees."
    client.chat.completions.create(model="fake-model", messages=HISTORY, tools=TOOLS)
    messages = engine.tokenizer.last_chat["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"].startswith("<tool_call>\n") and '"get_weather"' in messages[2]["content"]
    assert messages[3]["content"] == "<tool_response>\n21 degrees\n</tool_response>"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type", "function"),
        # OpenAI's other tool kinds carry no `function`: their type is what is not served.
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type", "type 'custom'"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "only 'function' tools"),
        # The Responses API's flat choice, or another kind's: the forms chat takes are named.
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "name": "get_weather"}},
            "tool_choice",
            "{'type': 'function', 'function': {'name': <string>}}",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "custom", "custom": {"name": "f"}}},
            "tool_choice",
            "'allowed_tools'",
        ),
        ({"tools": [{"type": "function", "function": {"name": "a" * 65}}]}, "tools[0].function.name", "64"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1]", "twice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
            "object",
        ),
        # Parameters that require themselves have no finite value: a strict or forced call could not end.
        (
            {"tools": [{"type": "function", "function": {**ENDLESS_FUNCTION, "strict": True}}]},
            "tools[0].function.parameters",
            "has no finite output",
        ),
        (
            {
                "tools": [TOOLS[0], {"type": "function", "function": ENDLESS_FUNCTION}],
                "tool_choice": "required",
            },
            "tools[1].function.parameters",
            "has no finite output",
        ),
        # The client's own constraint, beside the calls in one grammar, is checked as it is alone.
        (
            {
                "tools": TOOLS,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "nest", "schema": ENDLESS_FUNCTION["parameters"]},
                },
            },
            "response_format",
            "has no finite output",
        ),
        ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice", "tool_choice"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "tool_call_id"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]},
            "messages[0].tool_call_id",
            "tool",
        ),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(
    server: BackgroundServer, body: dict[str, Any], param: str, words: str
) -> None:
    response = post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_a_chosen_parser_reads_its_family_and_keeps_special_tokens() -> None:
    engine = FakeEngine(
        max_model_len=4096, reply=f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {PARIS}}}]'
    )
    with BackgroundServer(engine, ServerSettings(tool_call_parser="mistral")) as running:
        body = post(running, {"tools": TOOLS}).json()
    [call] = body["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": PARIS}
    assert engine.calls[-1].params.skip_special_tokens is False


def test_hermes_markers_the_tokenizer_has_as_special_tokens_stay_in_the_text() -> None:
    engine = FakeEngine(max_model_len=4096, reply=HERMES_REPLY)
    # The fake's ids below 3 decode to nothing without special tokens: markers among them are special.
    engine.tokenizer.added_tokens = {"<tool_call>": 1, "</tool_call>": 2}
    with BackgroundServer(engine) as running:
        assert post(running, {"tools": TOOLS}).status_code == 200
        assert engine.calls[-1].params.skip_special_tokens is False
        engine.tokenizer.added_tokens = {}
        assert post(running, {"tools": TOOLS}).status_code == 200
        assert engine.calls[-1].params.skip_special_tokens is True


def test_qwen3_coder_calls_are_read_with_their_parameters_typed_by_the_schema() -> None:
    search = {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            },
        },
    }
    reply = (
        "<tool_call>\n<function=search>\n<parameter=query>\n10\n</parameter>\n"
        "<parameter=limit>\n10\n</parameter>\n</function>\n</tool_call>"
    )
    engine = FakeEngine(max_model_len=4096, reply=reply)
    with BackgroundServer(engine, ServerSettings(tool_call_parser="qwen3_coder")) as running:
        body = post(running, {"tools": [search]}).json()
        [call] = body["choices"][0]["message"]["tool_calls"]
        assert call["function"] == {"name": "search", "arguments": '{"query": "10", "limit": 10}'}
        assert body["choices"][0]["finish_reason"] == "tool_calls"
        # Forced: the same markup, under a grammar that types each value by the schema.
        forced = post(running, {"tools": [search], "tool_choice": "required"}).json()
        [call] = forced["choices"][0]["message"]["tool_calls"]
        assert json.loads(call["function"]["arguments"]) == {"query": "10", "limit": 10}
        grammar = engine.calls[-1].params.structured_outputs.grammar
        assert grammar is not None and '"<parameter=limit>\\n"' in grammar
        # A string pattern raw text cannot carry: plain JSON, which the grammar holds to the schema.
        search["function"]["parameters"]["properties"]["query"]["pattern"] = "^[a-z]+$"
        engine.reply = '[{"name": "search", "parameters": {"query": "x", "limit": 3}}]'
        forced = post(running, {"tools": [search], "tool_choice": "required"}).json()
        [call] = forced["choices"][0]["message"]["tool_calls"]
        assert json.loads(call["function"]["arguments"]) == {"query": "x", "limit": 3}
        assert engine.calls[-1].params.structured_outputs.json is not None


def test_auto_without_a_parser_is_refused() -> None:
    with BackgroundServer(FakeEngine(max_model_len=4096), ServerSettings(tool_call_parser="none")) as running:
        response = post(running, {"tools": TOOLS})
        assert (
            response.status_code == 400 and "--tool-call-parser none" in response.json()["error"]["message"]
        )
        assert post(running, {"tools": TOOLS, "tool_choice": "required"}).status_code == 200


def test_the_openai_client_s_own_message_objects_come_back_as_history(
    client: Any, engine: FakeEngine
) -> None:
    """OpenAI's function-calling guide appends `completion.choices[0].message` to the messages as it came;
    the client then sends the fields its objects carry beside the API's (annotations, the parse helpers'
    `parsed` and `parsed_arguments`, a streamed call's `index`), which are history, not a 400."""
    weather = openai.pydantic_function_tool(Weather, name="get_weather")
    engine.reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    parsed = client.chat.completions.parse(
        model="fake-model", messages=USER, tools=[weather], tool_choice="required", parallel_tool_calls=False
    )
    with client.chat.completions.stream(
        model="fake-model", messages=USER, tools=[weather], tool_choice="required", parallel_tool_calls=False
    ) as stream:
        streamed = stream.get_final_completion()
    engine.reply = "Sunny."
    for message in (parsed.choices[0].message, streamed.choices[0].message):
        for sent in (message, message.model_dump()):
            answer = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny"}
            reply = client.chat.completions.create(
                model="fake-model", messages=[*USER, sent, answer], tools=[weather]
            )
            assert reply.choices[0].message.content == "Sunny."
    assert message.model_dump()["annotations"] is None and message.tool_calls[0].index == 0


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
def test_an_allowed_tools_choice_forces_a_call_of_its_tools_alone(
    server: BackgroundServer, engine: FakeEngine, endpoint: str
) -> None:
    """OpenAI's allowed_tools tool_choice (pydantic-ai's for a step that may call some tools): chat's
    form, and the Responses API's flat one."""
    engine.reply = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    if endpoint == "chat":
        choice = {"type": "function", "function": {"name": "get_time"}}
        response = post(
            server,
            {
                "tools": TOOLS,
                "tool_choice": {
                    "type": "allowed_tools",
                    "allowed_tools": {"mode": "required", "tools": [choice]},
                },
            },
        )
        assert response.status_code == 200, response.text
        [call] = response.json()["choices"][0]["message"]["tool_calls"]
        name = call["function"]["name"]
    else:
        flat = [{"type": "function", **cast(dict[str, Any], tool["function"])} for tool in TOOLS]
        body = {
            "input": "What time is it?",
            "tools": flat,
            "tool_choice": {
                "type": "allowed_tools",
                "mode": "required",
                "tools": [{"type": "function", "name": "get_time"}],
            },
        }
        response = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=30)
        assert response.status_code == 200, response.text
        [call] = response.json()["output"]
        name = call["name"]
    assert name == "get_time"
    constraint = engine.calls[-1].params.structured_outputs
    assert constraint is not None and constraint.grammar is not None
    assert '"get_time"' in constraint.grammar and '"get_weather"' not in constraint.grammar
    assert "get_weather" in prompt_of(engine)  # the prompt still offers every tool


@pytest.mark.parametrize(
    ("choice", "param"),
    [
        (
            {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "nope"}]},
            "tool_choice.tools[0]",
        ),
        ({"type": "allowed_tools", "mode": "sometimes", "tools": []}, "tool_choice.mode"),
        (
            {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "mcp", "server_label": "x"}]},
            "tool_choice.tools[0]",
        ),
        ("sometimes", "tool_choice"),
    ],
)
def test_a_responses_tool_choice_that_cannot_be_served_is_400_naming_the_field(
    server: BackgroundServer, choice: Any, param: str
) -> None:
    flat = [{"type": "function", **cast(dict[str, Any], tool["function"])} for tool in TOOLS]
    body = {"input": "What time is it?", "tools": flat, "tool_choice": choice}
    response = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
