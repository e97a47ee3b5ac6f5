"""How POST /v1/responses reads a request: the conversation read back from output items as chat's
messages, message parts and roles, hints with nothing to act on, `truncation: auto`, and 400s naming
the Responses fields."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from batchlm.server.background import BackgroundServer
from batchlm.server.protocol_responses import ResponsesRequest
from batchlm.server.responses_input import chat_form
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine
from responses_harness import FLAT_TOOLS, REPLY, THINKING_REPLY, THOUGHT, post
from tools_harness import HERMES_REPLY, TOOLS


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096, cached_tokens=3)


@pytest.fixture(scope="module")
def server_settings() -> ServerSettings:
    return ServerSettings(reasoning_parser="think")


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
