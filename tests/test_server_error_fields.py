"""The 400s that name the field at fault, in OpenAI's shape {"error": {message, type, param, code}}:
bodies that are not JSON objects, unknown and missing fields, invalid and unsupported values of chat
and completions, history shapes not served, values no member of a union takes, booleans for numbers,
and a client's dict keys (every other error status: tests/test_server_error_statuses.py)."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from error_shape import error_of
from fake_engine import FakeEngine
from server_errors_harness import CHAT, MAX_BODY, USER, post


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=64)


@pytest.fixture(scope="module")
def server_settings() -> ServerSettings:
    return ServerSettings(max_body_bytes=MAX_BODY)


def test_malformed_json_is_400(server: BackgroundServer) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    error = error_of(response, 400)
    assert "not valid JSON" in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("content", [b"[1, 2]", b'"text"'])
def test_body_that_is_not_an_object_is_400(server: BackgroundServer, content: bytes) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    assert "JSON object" in error_of(response, 400)["message"]


def test_unknown_field_is_named(server: BackgroundServer) -> None:
    error = error_of(post(server, "/v1/chat/completions", {**CHAT, "temprature": 0.5}), 400)
    assert error["param"] == "temprature"
    assert error["message"] == "Unrecognized request argument supplied: temprature"


def test_missing_required_field_is_named(server: BackgroundServer) -> None:
    error = error_of(post(server, "/v1/chat/completions", {"max_tokens": 2}), 400)
    assert error["param"] == "messages"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 150}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"1_0": 1}}, "logit_bias"),
        ({"logit_bias": {" 5": 1}}, "logit_bias"),
        ({"logit_bias": {"5.0": 1}}, "logit_bias"),
        ({"logit_bias": {"\u0665": 1}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias"),
        ({"stop_token_ids": [99999]}, "stop_token_ids"),
        ({"min_tokens": 5}, "min_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": []}, "messages"),
    ],
)
def test_invalid_chat_values_are_400_naming_the_field(
    server: BackgroundServer, extra: Any, param: str
) -> None:
    assert error_of(post(server, "/v1/chat/completions", {**CHAT, **extra}), 400)["param"] == param


@pytest.mark.parametrize(
    ("extra", "param", "named", "unsent"),
    [
        ({"logprobs": True, "top_logprobs": 30}, "top_logprobs", {"top_logprobs"}, "logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", {"max_completion_tokens"}, "max_tokens"),
        (
            {"max_completion_tokens": 2, "min_tokens": 3},
            "min_tokens",
            {"min_tokens", "max_completion_tokens"},
            "max_tokens",
        ),
    ],
)
def test_an_invalid_value_is_described_by_the_names_the_client_sent(
    server: BackgroundServer, extra: Any, param: str, named: set[str], unsent: str
) -> None:
    error = error_of(post(server, "/v1/chat/completions", {"messages": USER, **extra}), 400)
    assert error["param"] == param
    words = set(re.findall(r"\w+", error["message"]))
    assert named <= words and unsent not in words, error["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"store": True}, "store"),
        ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0]"),
        # Refusals are the assistant's alone.
        (
            {"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
            "messages[0].content[0].type",
        ),
        ({"continue_final_message": True}, "continue_final_message"),
    ],
)
def test_unsupported_chat_features_are_400_naming_the_field(
    server: BackgroundServer, extra: Any, param: str
) -> None:
    error = error_of(post(server, "/v1/chat/completions", {**CHAT, **extra}), 400)
    assert error["param"] == param
    assert param.split("[")[0].split(".")[0] in error["message"]


CALLED = {"role": "assistant", "content": None}


@pytest.mark.parametrize(
    ("message", "param", "says"),
    [
        # An OpenAI reply with audio, sent back: its audio cannot be read here.
        ({**CALLED, "audio": {"id": "audio_1"}}, "messages[1].audio", "no audio"),
        (
            {**CALLED, "function_call": {"name": "f", "arguments": "{}"}},
            "messages[1].function_call",
            "'tool_calls'",
        ),
        ({"role": "function", "name": "f", "content": "1"}, "messages[1].role", "'tool' message"),
        # A custom tool's call carries `custom`, not `function`: named as not served, not as missing.
        (
            {**CALLED, "tool_calls": [{"id": "c", "type": "custom", "custom": {"name": "f", "input": "x"}}]},
            "messages[1].tool_calls[0].type",
            "'custom' are not supported",
        ),
        ({"role": "user", "content": "x", "refusal": "no"}, "messages[1].refusal", "only assistant"),
        ({"role": "user", "content": [{"text": "x"}]}, "messages[1].content[0].type", "Missing required"),
        (
            {"role": "assistant", "content": [{"type": "refusal", "refusal": 1}]},
            "messages[1].content[0]",
            "'refusal': <string>",
        ),
    ],
)
def test_history_shapes_not_served_are_400s_saying_what_is_not_served(
    server: BackgroundServer, message: dict[str, Any], param: str, says: str
) -> None:
    error = error_of(post(server, "/v1/chat/completions", {**CHAT, "messages": [*USER, message]}), 400)
    assert error["param"] == param
    assert says in error["message"] and "None" not in error["message"], error["message"]


def test_the_deprecated_functions_point_at_tools(server: BackgroundServer) -> None:
    error = error_of(post(server, "/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}), 400)
    assert "'tools'" in error["message"] and "'tool_choice'" in error["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(server: BackgroundServer) -> None:
    extra = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "modalities": ["text"]}
    assert post(server, "/v1/chat/completions", {**CHAT, **extra}).status_code == 200


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"suffix": "tail"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [5, 99999]}, "prompt"),
        ({"prompt": [1.5]}, "prompt[0]"),  # the token id at fault, not the string prompt
        ({"logprobs": 21}, "logprobs"),
    ],
)
def test_invalid_completion_requests(server: BackgroundServer, extra: Any, param: str) -> None:
    body = {"prompt": "hi", "max_tokens": 2, **extra}
    assert error_of(post(server, "/v1/completions", body), 400)["param"] == param


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_a_reserved_chat_template_kwarg_is_named(server: BackgroundServer, path: str) -> None:
    # apply_chat_template's own parameters are refused as the client's field, not as the template's failure.
    body = {"messages": USER, "chat_template_kwargs": {"add_generation_prompt": False}}
    error = error_of(post(server, path, body), 400)
    assert error["param"] == "chat_template_kwargs"
    assert "may not set add_generation_prompt" in error["message"]


@pytest.mark.parametrize(
    ("path", "extra", "param", "message"),
    [
        # pydantic fails a union in each of its members, the first (a literal, a string) first.
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}],
         "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto"}}},
         "tool_choice.allowed_tools.tools", "Missing required parameter"),
        ("/v1/chat/completions", {"stop": ["ok", None]}, "stop[1]", "valid string"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [5]}]},
         "messages[0].content[0]", "valid dictionary"),
        ("/v1/completions", {"prompt": [1, "a"]}, "prompt[1]", "valid integer"),
        # Strings up to the item that is not one: not the first string, read as a token id.
        ("/v1/completions", {"prompt": ["a", 1]}, "prompt[1]", "valid string"),
        ("/v1/completions", {"prompt": [[1], "a"]}, "prompt[1]", "valid list"),
        # A batch of texts with a number in it, not token ids read out of its digits.
        ("/v1/completions", {"prompt": ["1", 2]}, "prompt[1]", "valid string"),
        ("/v1/completions", {"prompt": [1, "2"]}, "prompt[1]", "valid integer"),
        ("/v1/completions", {"prompt": [[1, True]]}, "prompt[0][1]", "valid integer"),
    ],
)  # fmt: skip
def test_a_value_no_member_of_a_union_takes_is_named_where_it_went_wrong(
    server: BackgroundServer, path: str, extra: dict[str, Any], param: str, message: str
) -> None:
    body = {**(CHAT if "chat" in path else {"prompt": "hi", "max_tokens": 2}), **extra}
    error = error_of(post(server, path, body), 400)
    assert error["param"] == param
    assert message in error["message"] and f"'{param}'" in error["message"]


@pytest.mark.parametrize(
    ("path", "extra", "param", "kind"),
    [
        # Read as 0, false would have asked for the tokens' logprobs.
        ("/v1/completions", {"logprobs": False}, "logprobs", "integer"),
        ("/v1/completions", {"max_tokens": True}, "max_tokens", "integer"),
        ("/v1/chat/completions", {"temperature": True}, "temperature", "number"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": False}, "top_logprobs", "integer"),
        ("/v1/responses", {"max_output_tokens": True}, "max_output_tokens", "integer"),
    ],
)  # fmt: skip
def test_a_boolean_is_not_a_number(
    server: BackgroundServer, path: str, extra: dict[str, Any], param: str, kind: str
) -> None:
    bodies = {"/v1/completions": {"prompt": "hi", "max_tokens": 2}, "/v1/chat/completions": CHAT}
    error = error_of(post(server, path, {**bodies.get(path, {"input": "hi"}), **extra}), 400)
    assert error["param"] == param
    assert error["message"] == f"Invalid value for '{param}': Input should be a valid {kind}, not a boolean."


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"logit_bias": {"a[0]": "x"}}, "logit_bias.a[0]"),
        ("/v1/chat/completions", {"logit_bias": {"str": "x"}}, "logit_bias.str"),
        ("/v1/chat/completions", {"logit_bias": {"ChatMessage": "x"}}, "logit_bias.ChatMessage"),
        ("/v1/responses", {"metadata": {"items[0]": 3}}, "metadata.items[0]"),
    ],
)  # fmt: skip
def test_a_client_s_dict_key_that_looks_like_a_union_member_is_named_as_sent(
    server: BackgroundServer, path: str, extra: dict[str, Any], param: str
) -> None:
    """pydantic names a union's member in `loc` ("str", "list[int]", a model's name) as it names a dict's
    key: a key of the client's that reads as one is kept, not dropped from the field named."""
    body = {**(CHAT if "chat" in path else {"input": "hi"}), **extra}
    error = error_of(post(server, path, body), 400)
    assert error["param"] == param and f"'{param}'" in error["message"]
