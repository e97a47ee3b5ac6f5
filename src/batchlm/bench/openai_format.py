"""The OpenAI wire format as the benchmark needs it: request bodies out, response chunks read back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from batchlm.bench.records import RequestSpec

_ERROR_SNIPPET_CHARS = 200

# The API a run speaks, by --backend: /completions (prompt, text), /chat/completions (messages,
# delta.content) or /responses (input, typed events).
Api = Literal["completions", "chat", "responses"]
BACKENDS: dict[str, Api] = {"openai": "completions", "openai-chat": "chat", "openai-responses": "responses"}
API_PATHS: dict[Api, str] = {
    "completions": "/completions",
    "chat": "/chat/completions",
    "responses": "/responses",
}
# The Responses events that carry generated text, and those that end a stream.
RESPONSES_TEXT_EVENTS = ("response.output_text.delta", "response.reasoning_text.delta")
RESPONSES_END_EVENTS = ("response.completed", "response.incomplete")


@dataclass(frozen=True)
class EndpointConfig:
    """How to talk to the server under test; the same for every request of a run."""

    # Full URL the requests are POSTed to.
    url: str
    api: Api
    # The "model" field of every request.
    model: str
    # Send stream=true and time every chunk.
    stream: bool
    # Ask for a final usage chunk (stream_options.include_usage); streaming only.
    include_usage: bool = True
    # Send ignore_eos=true so every request generates exactly max_tokens (vLLM extension).
    ignore_eos: bool = False
    # HTTP headers of every request (Authorization, Content-Type, user extras).
    headers: dict[str, str] = field(default_factory=dict)
    # Fields merged last into every body (sampling parameters, user --extra-body).
    extra_body: dict[str, Any] = field(default_factory=dict)
    # Keep generated text in the results (for --save-detailed).
    keep_text: bool = False


@dataclass(frozen=True)
class ChunkView:
    """What one decoded response object (stream chunk or full response) says."""

    # Generated text in this object, all choices together ("" for role or usage-only chunks).
    text: str
    # usage.completion_tokens / usage.prompt_tokens when the object carries usage.
    completion_tokens: int | None
    prompt_tokens: int | None
    # An error the server reported in-band; None when there is none.
    error: str | None
    # The stream's last event (Responses' response.completed; the others end with data: [DONE]).
    final: bool = False


def build_body(endpoint: EndpointConfig, spec: RequestSpec) -> bytes:
    """The JSON body of one request."""
    body: dict[str, Any] = {"model": endpoint.model, "stream": endpoint.stream}
    if endpoint.api == "responses":
        # Its streams always end with the usage.
        body.update(input=spec.prompt, max_output_tokens=spec.max_tokens)
    else:
        body["max_tokens"] = spec.max_tokens
        if endpoint.api == "chat":
            body["messages"] = [{"role": "user", "content": spec.prompt}]
        else:
            body["prompt"] = spec.prompt
        if endpoint.stream and endpoint.include_usage:
            body["stream_options"] = {"include_usage": True}
    if endpoint.ignore_eos:
        body["ignore_eos"] = True
    body.update(endpoint.extra_body)
    return json.dumps(body).encode()


def read_object(payload: Any, api: Api) -> ChunkView:
    """Interprets one decoded JSON object from the server (a stream chunk or event, or a whole response)."""
    if not isinstance(payload, dict):
        return ChunkView(
            "", None, None, f"malformed response: expected a JSON object, got {_snippet(payload)}"
        )
    if api == "responses":
        return _read_responses_object(payload)
    error = _inband_error(payload)
    if error is not None:
        return ChunkView("", None, None, error)
    usage = payload.get("usage")
    completion_tokens = prompt_tokens = None
    if isinstance(usage, dict):
        completion_tokens = _count(usage.get("completion_tokens"))
        prompt_tokens = _count(usage.get("prompt_tokens"))
    try:
        text = _choices_text(payload.get("choices"), api == "chat")
    except _Malformed as exc:
        return ChunkView("", None, None, f"malformed response: {exc}")
    return ChunkView(text, completion_tokens, prompt_tokens, None)


class _Malformed(ValueError):
    """A response object whose fields are not of the types the API gives them."""


def _count(value: Any) -> int | None:
    """A usage count when it is one (a whole number, at least 0); anything else counts as absent, so
    that a server's odd field cannot break the token arithmetic."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


def _read_responses_object(payload: dict[str, Any]) -> ChunkView:
    """A Responses stream event, or a whole response object (its output's text and thinking)."""
    kind = payload.get("type")
    if kind == "error":
        return ChunkView("", None, None, f"in-band error: {_snippet(payload.get('message') or payload)}")
    if kind in RESPONSES_TEXT_EVENTS:
        return ChunkView(str(payload.get("delta") or ""), None, None, None)
    response = payload.get("response") if kind is not None else payload
    if not isinstance(response, dict):
        return ChunkView("", None, None, _inband_error(payload))
    if kind == "response.failed" or response.get("status") == "failed":
        error = response.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        return ChunkView("", None, None, f"in-band error: {_snippet(message or 'the response failed')}")
    usage = response.get("usage")
    output_tokens = input_tokens = None
    if isinstance(usage, dict):
        output_tokens, input_tokens = _count(usage.get("output_tokens")), _count(usage.get("input_tokens"))
    # A stream's text came in its deltas; a whole response holds it in its output items.
    text = "" if kind is not None else _output_text(response.get("output"))
    return ChunkView(
        text, output_tokens, input_tokens, _inband_error(response), final=kind in RESPONSES_END_EVENTS
    )


def _output_text(items: Any) -> str:
    parts: list[str] = []
    for item in items if isinstance(items, list) else ():
        content = item.get("content") if isinstance(item, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") in ("output_text", "reasoning_text"):
                parts.append(str(part.get("text") or ""))
    return "".join(parts)


def _choices_text(choices: Any, chat: bool) -> str:
    """The text of every choice; raises _Malformed where a field is not of its API type."""
    if not choices:
        return ""
    if not isinstance(choices, list):
        raise _Malformed(f"choices is not a list: {_snippet(choices)}")
    parts: list[str] = []
    for choice in choices:
        if not isinstance(choice, dict):
            raise _Malformed(f"a choice is not an object: {_snippet(choice)}")
        if chat:
            # Streams carry "delta"; full responses carry "message". Reasoning text is output too.
            message = choice.get("delta") or choice.get("message") or {}
            if not isinstance(message, dict):
                raise _Malformed(f"a choice's delta is not an object: {_snippet(message)}")
            _add_text(parts, message, "content")
            # The same thinking under both names (vLLM while renaming it, mlx-vlm) is counted once.
            if not _add_text(parts, message, "reasoning_content"):
                _add_text(parts, message, "reasoning")
        else:
            _add_text(parts, choice, "text")
    return parts[0] if len(parts) == 1 else "".join(parts)


def _add_text(parts: list[str], fields: dict[str, Any], key: str) -> bool:
    """Appends fields[key] when it is non-empty text; whether it did."""
    value = fields.get(key)
    if value is None or value == "":
        return False
    if not isinstance(value, str):
        raise _Malformed(f"{key} is not a string: {_snippet(value)}")
    parts.append(value)
    return True


def _inband_error(payload: dict[str, Any]) -> str | None:
    """Servers report errors inside a 200 stream as {"error": {...}} or {"object": "error", ...}."""
    error = payload.get("error")
    if error is None and payload.get("object") == "error":
        error = payload
    if error is None:
        return None
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or json.dumps(error)
        return f"in-band error: {_snippet(message)}"
    return f"in-band error: {_snippet(error)}"


def error_event_reason(data: str) -> str:
    """The failure an error event reports (`event: error`, or llama.cpp's `error:` field): the message
    of its JSON object ({"error": {...}}, or the object itself), else its text."""
    try:
        payload = json.loads(data)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error = _inband_error(payload)
        if error is not None:
            return error
        message = payload.get("message") or payload.get("detail")
        if message:
            return f"in-band error: {_snippet(message)}"
    return f"in-band error: {_snippet(data)}"


def http_error_reason(status: int, body: bytes) -> str:
    """A failure reason for a non-2xx response, with the server's own message when it gave one."""
    text = body.decode("utf-8", errors="replace")
    message: Any = text
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail") or text
        else:
            message = error
    return f"HTTP {status}: {_snippet(message)}" if text.strip() else f"HTTP {status}"


def _snippet(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_SNIPPET_CHARS else text[: _ERROR_SNIPPET_CHARS - 3] + "..."
