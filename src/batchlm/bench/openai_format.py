"""The OpenAI wire format as the benchmark needs it: request bodies out, response chunks read back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from batchlm.bench.records import RequestSpec

_ERROR_SNIPPET_CHARS = 200


@dataclass(frozen=True)
class EndpointConfig:
    """How to talk to the server under test; the same for every request of a run."""

    # Full URL the requests are POSTed to.
    url: str
    # True: /chat/completions (messages, delta.content); False: /completions (prompt, text).
    chat: bool
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


def build_body(endpoint: EndpointConfig, spec: RequestSpec) -> bytes:
    """The JSON body of one request."""
    body: dict[str, Any] = {"model": endpoint.model, "max_tokens": spec.max_tokens, "stream": endpoint.stream}
    if endpoint.chat:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if endpoint.stream and endpoint.include_usage:
        body["stream_options"] = {"include_usage": True}
    if endpoint.ignore_eos:
        body["ignore_eos"] = True
    body.update(endpoint.extra_body)
    return json.dumps(body).encode()


def read_object(payload: Any, chat: bool) -> ChunkView:
    """Interprets one decoded JSON object from the server (a stream chunk or a whole response)."""
    if not isinstance(payload, dict):
        return ChunkView(
            "", None, None, f"malformed response: expected a JSON object, got {_snippet(payload)}"
        )
    error = _inband_error(payload)
    if error is not None:
        return ChunkView("", None, None, error)
    usage = payload.get("usage")
    completion_tokens = prompt_tokens = None
    if isinstance(usage, dict):
        completion_tokens = usage.get("completion_tokens")
        prompt_tokens = usage.get("prompt_tokens")
    return ChunkView(_choices_text(payload.get("choices"), chat), completion_tokens, prompt_tokens, None)


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
