"""Sends one request over a shared aiohttp session and records its timeline into a RequestResult."""

from __future__ import annotations

import asyncio
import contextlib
import json
from time import perf_counter

import aiohttp

from batchlm.bench.openai_format import (
    Api,
    ChunkView,
    EndpointConfig,
    build_body,
    error_event_reason,
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
    # Collected always: a server that reports no usage has its output counted from the text.
    text_parts: list[str] = []
    done: bool | None = False
    # The body's first bytes, kept until an event arrives: a body with none was no event stream.
    head: bytes | None = b""
    async for block in response.content.iter_any():
        events = parser.feed(block)
        if head is not None:
            head = None if events else (head + block)[:_HEAD_BYTES]
        done = _record_events(events, perf_counter(), endpoint.api, result, text_parts)
        if done is None:
            return  # an error: leaving the context closes the connection
        if done:
            await _drain(response)
            break
    if not done:
        # The body ended; its last event may lack the blank line that ends an event.
        events = parser.finish()
        if not events and head is not None:
            result.error = _not_a_stream(head, response.content_type, endpoint.api)
            if result.error is not None:
                return
        done = _record_events(events, perf_counter(), endpoint.api, result, text_parts)
        if done is None:
            return
    if endpoint.keep_text or result.usage_completion_tokens is None:
        result.generated_text = "".join(text_parts)
    if not done:
        result.error = (
            f"truncated stream: ended without {_END[endpoint.api]} after "
            f"{len(result.chunk_times)} content chunks"
        )
    elif not result.chunk_times:
        result.error = f"empty stream: {_END[endpoint.api]} arrived without any generated text"


# How long the end of the body may take to follow the stream's last event before the connection is
# closed instead of reused.
DRAIN_GRACE_S = 1.0


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Reads what follows the last event, so that the pooled connection can be reused. The request is
    complete already: a server that then holds the body open, or resets the connection, costs at most
    the grace period and the connection, not the request (it was a timeout or transport failure)."""
    if response.content.at_eof():
        return  # the common case: the end of the body came with the last event
    # asyncio.TimeoutError is TimeoutError only from Python 3.11 on.
    with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
        await asyncio.wait_for(response.read(), DRAIN_GRACE_S)


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


# How much of a body without any event is kept to say what it was.
_HEAD_BYTES = 4096


def _not_a_stream(head: bytes, content_type: str, api: Api) -> str | None:
    """Why a streamed 200 whose body held no event at all failed: the server's error when the body is
    a JSON one (whatever its Content-Type), else what came instead of events (an HTML page, plain
    text); None for an event stream that was merely cut short."""
    try:
        json.loads(head)
    except ValueError:
        if content_type == "text/event-stream":
            return None
        return f"not a stream: the server answered stream=true with {content_type or 'no Content-Type'}: {head[:80]!r}"
    return _json_instead_of_stream(head, api)


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
    if event_name == "error":
        result.error = error_event_reason(data)
        return None
    try:
        payload = json.loads(data)
    except ValueError:
        result.error = f"malformed stream: data is not JSON: {data[:80]!r}"
        return None
    view = read_object(payload, api)
    if view.error is not None:
        result.error = view.error
        return None
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
    if endpoint.keep_text or view.completion_tokens is None:
        result.generated_text = view.text
    if not view.text:
        result.error = "empty response: no generated text"
