"""Sends one request over a shared aiohttp session and records its timeline into a RequestResult."""

from __future__ import annotations

import json
from time import perf_counter

import aiohttp

from batchlm.bench.openai_format import (
    Api,
    ChunkView,
    EndpointConfig,
    build_body,
    http_error_reason,
    read_object,
)
from batchlm.bench.records import RequestResult
from batchlm.bench.sse import DONE_SENTINEL, SSEEvent, SSEParser

# What ends a stream of each API.
_END: dict[Api, str] = {
    "completions": "data: [DONE]",
    "chat": "data: [DONE]",
    "responses": "response.completed or response.incomplete",
}


async def send_request(
    session: aiohttp.ClientSession, endpoint: EndpointConfig, result: RequestResult
) -> None:
    """Runs `result.spec` against the server. Never raises for server or network trouble: a failure
    is recorded as `result.error`, so it stays out of the latency statistics."""
    body = build_body(endpoint, result.spec)
    result.streamed = endpoint.stream
    for attempt in range(1 + _STALE_CONNECTION_RETRIES):
        result.start = perf_counter()
        answered = False
        try:
            async with session.post(endpoint.url, data=body, headers=endpoint.headers) as response:
                answered = True
                if not 200 <= response.status < 300:
                    result.error = http_error_reason(response.status, await response.read())
                elif endpoint.stream:
                    await _read_stream(response, endpoint, result)
                else:
                    await _read_whole(response, endpoint, result)
        except TimeoutError:
            result.error = "timeout: the response did not complete within --request-timeout"
        except (aiohttp.ClientError, OSError) as exc:
            if not answered and attempt < _STALE_CONNECTION_RETRIES and _stale_connection(exc):
                continue  # sent again on a fresh connection, timed from then
            result.error = f"transport: {type(exc).__name__}: {exc}"
        break
    if result.end == 0.0 or result.error is not None:
        result.end = perf_counter()


# A kept-alive connection the server closed just after its last answer (llama.cpp's llama-server closes
# every one after a stream while announcing Keep-Alive) may be handed out again before the client has
# seen the close; the request then dies unanswered, having never reached the server. It is sent once
# more, as curl and aiohttp (for idempotent methods) do; a second failure is the request's.
_STALE_CONNECTION_RETRIES = 1


def _stale_connection(exc: BaseException) -> bool:
    """Whether an unanswered request failed as on a connection the server had already closed (not a
    refused connect, which is the server's own failure)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return False
    return isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError))


async def _read_stream(
    response: aiohttp.ClientResponse, endpoint: EndpointConfig, result: RequestResult
) -> None:
    if response.content_type == "application/json":
        result.error = _json_instead_of_stream(await response.read(), endpoint.api)
        return
    parser = SSEParser()
    text_parts: list[str] | None = [] if endpoint.keep_text else None
    done: bool | None = False
    async for block in response.content.iter_any():
        if done:
            continue  # drain the rest so the pooled connection can be reused
        done = _record_events(parser.feed(block), perf_counter(), endpoint.api, result, text_parts)
        if done is None:
            return  # an error: leaving the context closes the connection
    if not done:
        # The body ended; its last event may lack the blank line that ends an event.
        done = _record_events(parser.finish(), perf_counter(), endpoint.api, result, text_parts)
        if done is None:
            return
    if text_parts is not None:
        result.generated_text = "".join(text_parts)
    if not done:
        result.error = (
            f"truncated stream: ended without {_END[endpoint.api]} after "
            f"{len(result.chunk_times)} content chunks"
        )
    elif not result.chunk_times:
        result.error = f"empty stream: {_END[endpoint.api]} arrived without any generated text"


def _record_events(
    events: list[SSEEvent], arrival: float, api: Api, result: RequestResult, text_parts: list[str] | None
) -> bool | None:
    """Folds events that arrived together into the result: True once the stream's last event came
    (`result.end` is then set), False while more are due, None on a failure (`result.error` set)."""
    for event in events:
        if event.data == DONE_SENTINEL:
            result.end = arrival
            return True
        view = _record_event(event.event, event.data, arrival, api, result, text_parts)
        if view is None:
            return None
        if view.final:
            result.end = arrival
            return True
    return False


def _json_instead_of_stream(raw: bytes, api: Api) -> str:
    """A JSON body where a stream was asked for: the server's error if it is one, else a clear reason."""
    try:
        view = read_object(json.loads(raw), api)
    except ValueError:
        return f"malformed response: body is not JSON: {raw[:80]!r}"
    return view.error or "not a stream: the server answered stream=true with one JSON response"


def _record_event(
    event_name: str,
    data: str,
    arrival: float,
    api: Api,
    result: RequestResult,
    text_parts: list[str] | None,
) -> ChunkView | None:
    """Folds one SSE event into the result; what it said, or None when the event is a failure."""
    try:
        payload = json.loads(data)
    except ValueError:
        payload = None
        if event_name != "error":
            result.error = f"malformed stream: data is not JSON: {data[:80]!r}"
            return None
    view = read_object(payload, api) if payload is not None else None
    if event_name == "error" or (view is not None and view.error is not None):
        result.error = (view.error if view is not None else None) or f"in-band error: {data[:200]}"
        return None
    assert view is not None
    if view.completion_tokens is not None:
        result.usage_completion_tokens = view.completion_tokens
    if view.prompt_tokens is not None:
        result.usage_prompt_tokens = view.prompt_tokens
    if view.text:
        result.chunk_times.append(arrival)
        result.chunk_cumulative_tokens.append(view.completion_tokens)
        result.generated_chars += len(view.text)
        if text_parts is not None:
            text_parts.append(view.text)
    return view


async def _read_whole(
    response: aiohttp.ClientResponse, endpoint: EndpointConfig, result: RequestResult
) -> None:
    raw = await response.read()
    result.end = perf_counter()
    try:
        payload = json.loads(raw)
    except ValueError:
        result.error = f"malformed response: body is not JSON: {raw[:80]!r}"
        return
    view = read_object(payload, endpoint.api)
    if view.error is not None:
        result.error = view.error
        return
    result.usage_completion_tokens = view.completion_tokens
    result.usage_prompt_tokens = view.prompt_tokens
    result.generated_chars = len(view.text)
    if endpoint.keep_text:
        result.generated_text = view.text
    if not view.text:
        result.error = "empty response: no generated text"
