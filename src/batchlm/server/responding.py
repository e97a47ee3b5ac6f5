"""The two ways a generation request is answered, shared by chat and completions: a Server-Sent Events
stream (role/content/finish chunks, usage, [DONE]; errors as an error event) or one JSON body."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from batchlm.outputs import FinishReason, RequestOutput, TokenLogprobs
from batchlm.server.errors import APIError, ClientDisconnected
from batchlm.server.generation import Generation
from batchlm.server.metrics import ServerMetrics
from batchlm.server.responses import PromptTokensDetails, UsageInfo
from batchlm.server.streams import (
    SSE_DONE,
    SSE_HEADERS,
    close_all,
    merge_outputs,
    run_until_disconnect,
    sse_event,
)

logger = logging.getLogger(__name__)

# Status of the (unsent) response to a client that disconnected, as nginx logs it.
CLIENT_CLOSED_REQUEST = 499


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its event generator, so that a disconnect noticed while
    sending (not while generating) still aborts the request at once instead of at garbage collection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


class StreamFormatter(Protocol):
    """Turns a request's deltas into SSE events (chat and completions differ in shape only)."""

    def opening(self) -> Iterable[bytes]: ...

    def delta(self, position: int, output: RequestOutput) -> Iterable[bytes]: ...

    def closing(self, usage: UsageInfo) -> Iterable[bytes]: ...


@dataclass
class ResponseContext:
    """What every chunk or response of one request repeats."""

    request_id: str
    created: int
    # The served model name, as responses report it.
    model: str
    tokenizer: Any
    n: int
    include_usage: bool


class ChunkFormatter:
    """The part of a StreamFormatter both endpoints share: wrapping choices in the endpoint's chunk
    object, and the closing usage chunk."""

    chunk_type: ClassVar[type[BaseModel]]

    def __init__(self, context: ResponseContext) -> None:
        self._response = context
        # Without include_usage OpenAI's chunks carry no "usage" key at all.
        self._exclude = None if context.include_usage else {"usage"}

    def _chunk(self, choices: Sequence[BaseModel], usage: UsageInfo | None = None) -> bytes:
        context = self._response
        chunk = self.chunk_type(
            id=context.request_id, created=context.created, model=context.model, choices=choices, usage=usage
        )
        return sse_event(chunk.model_dump_json(exclude=self._exclude))

    def closing(self, usage: UsageInfo) -> Iterable[bytes]:
        return [self._chunk([], usage)] if self._response.include_usage else []


@dataclass
class ChoiceResult:
    """Everything one completion produced, gathered for a non-streaming response."""

    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


def finish_reason(reason: FinishReason | None, called: bool) -> str | None:
    """The finish_reason a response sends: a chat completion that ended on its own after calling tools
    finishes with "tool_calls"."""
    if reason is None:
        return None
    return "tool_calls" if called and reason == FinishReason.STOP else FinishReason(reason).value


def usage_of(generations: Sequence[Generation]) -> UsageInfo:
    prompt = sum(len(g.prompt_token_ids) for g in generations)
    completion = sum(g.recorder.completion_tokens for g in generations)
    cached = sum(g.recorder.cached_tokens for g in generations)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


async def prime_all(generations: Sequence[Generation]) -> None:
    """Wait for every generation's first output; on the first failure the others are cancelled."""
    tasks = [asyncio.ensure_future(g.prime()) for g in generations]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def answer_or_disconnect(
    request: Request, generations: Sequence[Generation], respond: Callable[[], Awaitable[Response]]
) -> Response:
    """Run `respond` unless the client leaves first; the generations are closed unless a stream took them."""
    handed_over = False
    try:
        response = await run_until_disconnect(request, respond())
        handed_over = isinstance(response, StreamingResponse)
        return response
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        if not handed_over:
            await close_all(generations)


async def respond_json(
    request: Request, generations: Sequence[Generation], build: Callable[[], Awaitable[BaseModel]]
) -> Response:
    """The non-streaming answer: `build` gathers the generations into the response body."""

    async def respond() -> Response:
        body = await build()
        return Response(body.model_dump_json(), media_type="application/json")

    return await answer_or_disconnect(request, generations, respond)


async def start_stream(
    request: Request, generations: Sequence[Generation], formatter: StreamFormatter, metrics: ServerMetrics
) -> Response:
    """Errors before the first output (queue full, rejected, engine dead) still get their HTTP status."""

    async def respond() -> Response:
        await prime_all(generations)
        events = _stream_events(generations, formatter, metrics)
        return EventStreamResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    return await answer_or_disconnect(request, generations, respond)


async def _stream_events(
    generations: Sequence[Generation], formatter: StreamFormatter, metrics: ServerMetrics
) -> AsyncIterator[bytes]:
    try:
        try:
            for event in formatter.opening():
                yield event
            async for position, output in merge_outputs(generations):
                for event in formatter.delta(position, output):
                    yield event
            for event in formatter.closing(usage_of(generations)):
                yield event
        except APIError as error:
            metrics.count_error(error.status)
            yield sse_event(error.body())
        except Exception:
            logger.exception("a streaming response failed")
            metrics.count_error(500)
            yield sse_event(APIError(500, "The server had an internal error while streaming.").body())
        yield SSE_DONE
    finally:
        # Also runs when the client disconnects and the stream is cancelled: abort what is left.
        with anyio.CancelScope(shield=True):
            await close_all(generations)


async def collect_choices(generations: Sequence[Generation]) -> dict[tuple[int, int], ChoiceResult]:
    """(generation position, completion index) -> what it produced, once all have finished."""
    results: dict[tuple[int, int], ChoiceResult] = {}
    async for position, output in merge_outputs(generations):
        for completion in output.outputs:
            result = results.setdefault((position, completion.index), ChoiceResult())
            result.text_parts.append(completion.text)
            result.token_ids.extend(completion.token_ids)
            result.logprobs.extend(completion.logprobs or ())
            result.finish_reason = completion.finish_reason or result.finish_reason
    return results
