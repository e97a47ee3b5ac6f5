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
        completion_tokens = usage.get("completion_tokens")
        prompt_tokens = usage.get("prompt_tokens")
    return ChunkView(
        _choices_text(payload.get("choices"), api == "chat"), completion_tokens, prompt_tokens, None
    )


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
        output_tokens, input_tokens = usage.get("output_tokens"), usage.get("input_tokens")
    # A stream's text came in its deltas; a whole response holds it in its output items.
    text = "" if kind is not None else _output_text(response.get("output"))
    return ChunkView(
        text, output_tokens, input_tokens, _inband_error(response), final=kind in RESPONSES_END_EVENTS
    )


def _output_text(items: Any) -> str:
    parts: list[str] = []
    for item in items if isinstance(items, list) else ():
        for part in item.get("content") or () if isinstance(item, dict) else ():
            if isinstance(part, dict) and part.get("type") in ("output_text", "reasoning_text"):
                parts.append(str(part.get("text") or ""))
    return "".join(parts)


def _choices_text(choices: Any, chat: bool) -> str:
    if not choices:
        return ""
    parts: list[str] = []
    for choice in choices:
        if chat:
            # Streams carry "delta"; full responses carry "message". Reasoning text is output too.
            message = choice.get("delta") or choice.get("message") or {}
            for key in ("content", "reasoning_content", "reasoning"):
                value = message.get(key)
                if value:
                    parts.append(value)
        else:
            value = choice.get("text")
            if value:
                parts.append(value)
    return parts[0] if len(parts) == 1 else "".join(parts)


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
