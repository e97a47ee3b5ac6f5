"""Request bodies and the reading of response objects in the OpenAI format."""

from __future__ import annotations

import json

from batchlm.bench.openai_format import EndpointConfig, build_body, http_error_reason, read_object
from batchlm.bench.records import RequestSpec

SPEC = RequestSpec(prompt="Hi there", max_tokens=7)


def body(**changes: object) -> dict[str, object]:
    endpoint = EndpointConfig(
        **{"url": "http://x/v1/chat/completions", "chat": True, "model": "m", "stream": True, **changes}
    )  # type: ignore[arg-type]
    return json.loads(build_body(endpoint, SPEC))


def test_chat_body_asks_for_usage_when_streaming() -> None:
    assert body() == {
        "model": "m",
        "max_tokens": 7,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi there"}],
        "stream_options": {"include_usage": True},
    }


def test_usage_switch_non_streaming_and_completions_bodies() -> None:
    assert "stream_options" not in body(include_usage=False)
    assert "stream_options" not in body(stream=False)  # OpenAI rejects stream_options without stream
    completions = body(chat=False)
    assert completions["prompt"] == "Hi there" and "messages" not in completions


def test_ignore_eos_and_extra_body_override_last() -> None:
    sent = body(ignore_eos=True, extra_body={"temperature": 0.0, "max_tokens": 3})
    assert (sent["ignore_eos"], sent["temperature"], sent["max_tokens"]) == (True, 0.0, 3)


def test_read_object_chat_delta_message_reasoning_and_completions_text() -> None:
    assert read_object({"choices": [{"delta": {"content": "a"}}]}, chat=True).text == "a"
    assert read_object({"choices": [{"message": {"content": "whole"}}]}, chat=True).text == "whole"
    assert (
        read_object({"choices": [{"delta": {"reasoning_content": "r", "content": "c"}}]}, chat=True).text
        == "cr"
    )
    assert read_object({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, chat=True).text == ""
    assert read_object({"choices": [{"text": "t"}]}, chat=False).text == "t"


def test_read_object_usage_only_chunk() -> None:
    view = read_object({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}}, chat=True)
    assert (view.text, view.prompt_tokens, view.completion_tokens, view.error) == ("", 4, 9, None)


def test_read_object_in_band_errors() -> None:
    assert read_object({"error": {"message": "boom"}}, chat=True).error == "in-band error: boom"
    assert (
        read_object({"object": "error", "message": "vllm style"}, chat=True).error
        == "in-band error: vllm style"
    )
    assert read_object({"error": "plain"}, chat=True).error == "in-band error: plain"
    assert read_object([1, 2], chat=True).error == "malformed response: expected a JSON object, got [1, 2]"


def test_http_error_reasons() -> None:
    assert http_error_reason(400, b'{"error": {"message": "bad   model"}}') == "HTTP 400: bad model"
    assert http_error_reason(503, b"overloaded\n") == "HTTP 503: overloaded"
    assert http_error_reason(404, b"") == "HTTP 404"
    assert http_error_reason(422, b'{"detail": [{"msg": "bad"}]}') == 'HTTP 422: [{"msg": "bad"}]'
    long = http_error_reason(500, b"x" * 500)
    assert len(long) == len("HTTP 500: ") + 200 and long.endswith("...")
