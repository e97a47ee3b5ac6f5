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
from batchlm.bench.sse import DONE_SENTINEL, SSEParser

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
    result.start = perf_counter()
    try:
        async with session.post(endpoint.url, data=body, headers=endpoint.headers) as response:
            if not 200 <= response.status < 300:
                result.error = http_error_reason(response.status, await response.read())
            elif endpoint.stream:
                await _read_stream(response, endpoint, result)
            else:
                await _read_whole(response, endpoint, result)
    except TimeoutError:
        result.error = "timeout: the response did not complete within --request-timeout"
    except (aiohttp.ClientError, OSError) as exc:
        result.error = f"transport: {type(exc).__name__}: {exc}"
    if result.end == 0.0 or result.error is not None:
        result.end = perf_counter()


async def _read_stream(
    response: aiohttp.ClientResponse, endpoint: EndpointConfig, result: RequestResult
) -> None:
    if response.content_type == "application/json":
        result.error = _json_instead_of_stream(await response.read(), endpoint.api)
        return
    parser = SSEParser()
    text_parts: list[str] | None = [] if endpoint.keep_text else None
    done = False
    async for block in response.content.iter_any():
        if done:
            continue  # drain the rest so the pooled connection can be reused
        arrival = perf_counter()
        for event in parser.feed(block):
            if event.data == DONE_SENTINEL:
                done = True
                result.end = arrival
                break
            view = _record_event(event.event, event.data, arrival, endpoint.api, result, text_parts)
            if view is None:
                return  # an error: leaving the context closes the connection
            if view.final:
                done = True
                result.end = arrival
                break
    if text_parts is not None:
        result.generated_text = "".join(text_parts)
    if not done:
        result.error = (
            f"truncated stream: ended without {_END[endpoint.api]} after "
            f"{len(result.chunk_times)} content chunks"
        )
    elif not result.chunk_times:
        result.error = f"empty stream: {_END[endpoint.api]} arrived without any generated text"


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
