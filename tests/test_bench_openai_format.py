"""Request bodies and the reading of response objects in the OpenAI format."""

from __future__ import annotations

import json

from batchlm.bench.openai_format import (
    ChunkView,
    EndpointConfig,
    build_body,
    error_event_reason,
    http_error_reason,
    read_object,
)
from batchlm.bench.records import RequestSpec

SPEC = RequestSpec(prompt="Hi there", max_tokens=7)


def body(**changes: object) -> dict[str, object]:
    endpoint = EndpointConfig(
        **{"url": "http://x/v1/chat/completions", "api": "chat", "model": "m", "stream": True, **changes}
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
    completions = body(api="completions")
    assert completions["prompt"] == "Hi there" and "messages" not in completions


def test_ignore_eos_and_extra_body_override_last() -> None:
    sent = body(ignore_eos=True, extra_body={"temperature": 0.0, "max_tokens": 3})
    assert (sent["ignore_eos"], sent["temperature"], sent["max_tokens"]) == (True, 0.0, 3)


def test_read_object_chat_delta_message_reasoning_and_completions_text() -> None:
    assert read_object({"choices": [{"delta": {"content": "a"}}]}, api="chat").text == "a"
    assert read_object({"choices": [{"message": {"content": "whole"}}]}, api="chat").text == "whole"
    assert (
        read_object({"choices": [{"delta": {"reasoning_content": "r", "content": "c"}}]}, api="chat").text
        == "cr"
    )
    assert read_object({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, api="chat").text == ""
    assert read_object({"choices": [{"text": "t"}]}, api="completions").text == "t"


def test_read_object_usage_only_chunk() -> None:
    view = read_object({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}}, api="chat")
    assert (view.text, view.prompt_tokens, view.completion_tokens, view.error) == ("", 4, 9, None)


def test_read_object_in_band_errors() -> None:
    assert read_object({"error": {"message": "boom"}}, api="chat").error == "in-band error: boom"
    assert (
        read_object({"object": "error", "message": "vllm style"}, api="chat").error
        == "in-band error: vllm style"
    )
    assert read_object({"error": "plain"}, api="chat").error == "in-band error: plain"
    assert read_object([1, 2], api="chat").error == "malformed response: expected a JSON object, got [1, 2]"


def test_http_error_reasons() -> None:
    assert http_error_reason(400, b'{"error": {"message": "bad   model"}}') == "HTTP 400: bad model"
    assert http_error_reason(503, b"overloaded\n") == "HTTP 503: overloaded"
    assert http_error_reason(404, b"") == "HTTP 404"
    assert http_error_reason(422, b'{"detail": [{"msg": "bad"}]}') == 'HTTP 422: [{"msg": "bad"}]'
    long = http_error_reason(500, b"x" * 500)
    assert len(long) == len("HTTP 500: ") + 200 and long.endswith("...")


def test_responses_body_and_events() -> None:
    sent = body(api="responses", url="http://x/v1/responses", ignore_eos=True)
    assert sent == {
        "model": "m",
        "stream": True,
        "input": "Hi there",
        "max_output_tokens": 7,
        "ignore_eos": True,
    }
    delta = {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Hel", "sequence_number": 4}
    assert read_object(delta, api="responses") == ChunkView("Hel", None, None, None)
    thinking = {**delta, "type": "response.reasoning_text.delta", "delta": "hmm"}
    assert read_object(thinking, api="responses").text == "hmm"
    assert read_object({"type": "response.output_item.added", "item": {}}, api="responses") == ChunkView(
        "", None, None, None
    )
    usage = {"input_tokens": 3, "output_tokens": 8, "total_tokens": 11}
    completed = {
        "type": "response.completed",
        "response": {"status": "completed", "output": [], "usage": usage},
    }
    assert read_object(completed, api="responses") == ChunkView("", 8, 3, None, final=True)
    cut = {"type": "response.incomplete", "response": {"status": "incomplete", "usage": usage}}
    assert read_object(cut, api="responses").final
    error = {"type": "error", "code": "server_error", "message": "boom", "sequence_number": 9}
    assert read_object(error, api="responses").error == "in-band error: boom"
    failed = {"type": "response.failed", "response": {"status": "failed", "error": {"message": "it broke"}}}
    assert read_object(failed, api="responses").error == "in-band error: it broke"


def test_a_whole_response_object_gives_its_text_and_usage() -> None:
    response = {
        "object": "response",
        "status": "completed",
        "output": [
            {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "think "}]},
            {"type": "message", "content": [{"type": "output_text", "text": "answer"}]},
            {"type": "function_call", "arguments": "{}"},
        ],
        "usage": {"input_tokens": 2, "output_tokens": 5},
    }
    assert read_object(response, api="responses") == ChunkView("think answer", 5, 2, None)
    assert read_object({"error": {"message": "bad"}}, api="responses").error == "in-band error: bad"


def test_thinking_sent_under_both_names_is_read_once() -> None:
    """vLLM (while renaming the field) and mlx-vlm put the same thinking in `reasoning_content` and
    `reasoning`; it was read twice."""
    delta = {"reasoning_content": "think", "reasoning": "think"}
    assert read_object({"choices": [{"delta": delta}]}, api="chat").text == "think"
    assert read_object({"choices": [{"delta": {"reasoning": "r"}}]}, api="chat").text == "r"


def test_usage_counts_that_are_not_whole_numbers_are_absent() -> None:
    """A count of another type reached the token arithmetic (a string one crashed the report)."""
    for odd in ("7", None, -1, 2.5, True, [7]):
        view = read_object({"choices": [], "usage": {"completion_tokens": odd, "prompt_tokens": odd}}, "chat")
        assert (view.completion_tokens, view.prompt_tokens, view.error) == (None, None, None)
    assert (
        read_object({"choices": [], "usage": {"completion_tokens": 7.0}}, api="chat").completion_tokens == 7
    )
    responses_usage = {"type": "response.completed", "response": {"usage": {"output_tokens": "3"}}}
    assert read_object(responses_usage, api="responses").completion_tokens is None


def test_fields_of_the_wrong_type_are_a_malformed_response() -> None:
    """They raised AttributeError or TypeError out of the request, and the whole run died with them."""
    for payload in (
        {"choices": [None]},
        {"choices": "text"},
        {"choices": [{"delta": "text"}]},
        {"choices": [{"delta": {"content": ["a", "b"]}}]},
        {"choices": [{"delta": {"reasoning_content": 5}}]},
    ):
        error = read_object(payload, api="chat").error
        assert error is not None and error.startswith("malformed response: "), payload
    assert read_object({"choices": [{"text": {"t": 1}}]}, api="completions").error is not None
    odd_output = {"object": "response", "output": [{"content": 5}, "x"], "usage": {"output_tokens": 1}}
    assert read_object(odd_output, api="responses") == ChunkView("", 1, None, None)


def test_an_error_event_reason_is_its_message() -> None:
    assert error_event_reason('{"code": 500, "message": "llama boom"}') == "in-band error: llama boom"
    assert error_event_reason('{"error": {"message": "nested"}}') == "in-band error: nested"
    assert error_event_reason("engine   overloaded") == "in-band error: engine overloaded"
    assert error_event_reason("[1]") == "in-band error: [1]"
