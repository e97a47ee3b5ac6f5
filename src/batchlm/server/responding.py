"""How a generation request is answered, shared by chat and completions: its generations started, then
a Server-Sent Events stream (role/content/finish chunks, usage, [DONE]; errors as an error event) or one
JSON body, each raced against the client's disconnect."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from json.encoder import encode_basestring
from typing import Any, ClassVar, Generic, TypeVar

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from batchlm import __version__
from batchlm.engine.client import ServedModel
from batchlm.engine.input_processor import ValidatedRequest
from batchlm.outputs import FinishReason, RequestOutput, TokenLogprobs
from batchlm.server.errors import APIError, ClientDisconnected
from batchlm.server.generation import Generation, close_all, mark_all_failed, merge_outputs, prime_all
from batchlm.server.metrics import RequestRecorder, ServerMetrics
from batchlm.server.middleware import received_at
from batchlm.server.request_ids import request_id_of
from batchlm.server.responses import PromptTokensDetails, UsageInfo
from batchlm.server.state import get_state
from batchlm.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Status of the (unsent) response to a client that disconnected, as nginx logs it.
CLIENT_CLOSED_REQUEST = 499
SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: str | dict[str, Any]) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its event generator, so that a disconnect noticed while
    sending (not while generating) still aborts the request at once instead of at garbage collection.
    `on_close` runs after it: a generator the response never started runs no cleanup of its own."""

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            with anyio.CancelScope(shield=True):
                if aclose is not None:
                    await aclose()
                await self._on_close()


@dataclass
class ResponseContext:
    """What every chunk or response of one request repeats."""

    request_id: str
    # The served model name, as responses report it.
    model: str
    tokenizer: Tokenizer
    n: int
    include_usage: bool
    # When the request was taken (Unix seconds), as its chunks and response say.
    created: int = field(default_factory=lambda: int(time.time()), kw_only=True)
    # OpenAI's `system_fingerprint` of the serving configuration (see system_fingerprint).
    system_fingerprint: str | None = field(default=None, kw_only=True)


ContextT = TypeVar("ContextT", bound=ResponseContext, covariant=True)


@lru_cache(maxsize=8)
def system_fingerprint(model: ServedModel) -> str:
    """OpenAI's `system_fingerprint`: "fp_" and 10 hex digits of a digest of what answers depend on
    besides the request (batchlm's version, the model, its facts and defaults, the engine's
    configuration). Each start with the same configuration gives the same one; the KV cache's size,
    which follows the memory free at start-up, does not enter it."""
    described = replace(model, facts=replace(model.facts, num_blocks=0))
    digest = hashlib.sha256(repr((__version__, described)).encode()).hexdigest()
    return f"fp_{digest[:10]}"


@dataclass
class ChoiceResult:
    """Everything one completion produced, gathered for a non-streaming response."""

    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # The client's stop string or stop token id that ended it, if any.
    stop_reason: str | int | None = None
    # Its request's prompt logprobs, when they were asked (RequestOutput.prompt_logprobs).
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


# (generation position, completion index) -> what it produced.
ChoiceResults = dict[tuple[int, int], ChoiceResult]


class ResponseFormatter(ABC, Generic[ContextT]):
    """One endpoint's response shapes: SSE events from a request's deltas (opening, deltas, closing
    usage chunk) and the JSON body from its gathered choices. Chat and completions differ in shape only."""

    # The endpoint's chunk object, and its non-streaming response object.
    chunk_type: ClassVar[type[BaseModel]]
    response_type: ClassVar[type[BaseModel]]
    # A choice of a chunk (index 0, nothing in it), whose JSON _framed_chunk cuts chunks around.
    sample_choice: ClassVar[BaseModel]
    # The stream's last event.
    end_of_stream: ClassVar[bytes] = SSE_DONE

    def __init__(self, context: ContextT) -> None:
        self.context = context
        # Without include_usage OpenAI's chunks carry no "usage" key at all.
        self._exclude = None if context.include_usage else {"usage"}
        # The SSE event of a chunk around its one choice (see _framed_chunk).
        self._frame: tuple[str, str] | None = None

    def opening(self) -> Iterable[bytes]:
        return []

    @abstractmethod
    def delta(self, position: int, output: RequestOutput) -> Iterable[bytes]: ...

    @abstractmethod
    def choices(self, results: ChoiceResults) -> list[Any]: ...

    def closing(self, usage: UsageInfo) -> Iterable[bytes]:
        return [self._chunk([], usage)] if self.context.include_usage else []

    async def settle(self) -> None:
        """Work that must end before the response's last bytes go out (closing's events, or the
        body), done off the response's own building, which stays synchronous."""

    def failure(self, error: APIError) -> Iterable[bytes]:
        """The events of an error that ended the stream after it started."""
        return [sse_event(error.body())]

    def response(self, results: ChoiceResults, usage: UsageInfo) -> BaseModel:
        return self._wrap(self.response_type, self.choices(results), usage)

    def _chunk(self, choices: Sequence[BaseModel], usage: UsageInfo | None = None) -> bytes:
        chunk = self._wrap(self.chunk_type, choices, usage)
        return sse_event(chunk.model_dump_json(exclude=self._exclude))

    def _framed_chunk(self, choice_json: str) -> bytes:
        """A chunk of one choice whose JSON the caller wrote, for the events every streamed token makes:
        the pydantic chunk's own bytes, cut once around a sample choice, with this one in place of it
        (tests pin the two equal)."""
        if self._frame is None:
            head, tail = (
                self._chunk([self.sample_choice]).decode().split(self.sample_choice.model_dump_json()[1:-1])
            )
            self._frame = (head, tail)
        return f"{self._frame[0]}{choice_json}{self._frame[1]}".encode()

    def _wrap(self, kind: type[BaseModel], choices: Sequence[Any], usage: UsageInfo | None) -> BaseModel:
        context = self.context
        return kind(
            id=context.request_id,
            created=context.created,
            model=context.model,
            system_fingerprint=context.system_fingerprint,
            choices=choices,
            usage=usage,
        )


def json_text(text: str) -> str:
    """`text` as a JSON string, escaped as pydantic escapes it: json.dumps(text, ensure_ascii=False),
    whose encoder this is, without the encoder object that dumps makes each call for the non-default
    ensure_ascii (several times the cost, on every streamed chunk)."""
    return encode_basestring(text)


def finish_reason(reason: FinishReason | None, ends_in_calls: bool) -> str | None:
    """The finish_reason a response sends: a chat completion that stopped after calls, none of them cut
    off, finishes with "tool_calls"."""
    if reason is None:
        return None
    return "tool_calls" if ends_in_calls and reason == FinishReason.STOP else FinishReason(reason).value


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


async def respond(
    request: Request,
    engine_requests: Sequence[ValidatedRequest],
    formatter: ResponseFormatter[ResponseContext],
    stream: bool,
) -> Response:
    """Start the engine requests and give the answer, unless the client leaves first. A stream starts
    only after every generation's first output, so that errors before it (queue full, rejected, engine
    dead) still get their HTTP status. The generations are closed here unless a stream took them."""
    state = get_state(request)
    # One generation per engine request, each in the metrics from the HTTP arrival on. A batch's
    # prompts take admission turns as one request (like n), not one turn each.
    request_id, batch = formatter.context.request_id, len(engine_requests) > 1
    arrival, trace_id = received_at(request), request_id_of(request)
    generations: list[Generation] = []
    try:
        for position, engine_request in enumerate(engine_requests):
            engine_id = f"{request_id}-{position}" if batch else request_id
            prompt_tokens = len(engine_request.prompt_token_ids)
            recorder = RequestRecorder(state.metrics, engine_id, prompt_tokens, arrival, trace_id)
            group = request_id if batch else ""
            generation = Generation(state.engine, engine_id, engine_request, recorder, state.in_flight, group)
            generations.append(generation)
    except BaseException:
        await close_all(generations)
        raise

    async def answer() -> Response:
        if stream:
            await prime_all(generations)
            events = _stream_events(generations, formatter, state.metrics)
            return EventStreamResponse(
                events, lambda: close_all(generations), media_type="text/event-stream", headers=SSE_HEADERS
            )
        body = formatter.response(await collect_choices(generations), usage_of(generations))
        await formatter.settle()
        return Response(body.model_dump_json(), media_type="application/json")

    handed_over = False
    try:
        response = await run_until_disconnect(request, answer())
        handed_over = isinstance(response, StreamingResponse)
        return response
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception:
        mark_all_failed(generations)  # the error response counts the request, once
        raise
    finally:
        if not handed_over:
            await close_all(generations)


async def _stream_events(
    generations: Sequence[Generation], formatter: ResponseFormatter[ResponseContext], metrics: ServerMetrics
) -> AsyncIterator[bytes]:
    try:
        try:
            for event in formatter.opening():
                yield event
            async for position, output in merge_outputs(generations):
                for event in formatter.delta(position, output):
                    yield event
            # Its events are read once settled: what settling finds (a response not stored) is in them.
            closing = formatter.closing(usage_of(generations))
            await formatter.settle()
            for event in closing:
                yield event
        except Exception as error:
            if not isinstance(error, APIError):
                trace_id = generations[0].recorder.trace_id if generations else None
                logger.exception(
                    "the streaming response %s failed (X-Request-Id %s)",
                    formatter.context.request_id,
                    trace_id,
                )
                error = APIError(500, "The server had an internal error while streaming.")
            metrics.count_error(error.status)
            mark_all_failed(generations)
            for event in formatter.failure(error):
                yield event
        if formatter.end_of_stream:
            yield formatter.end_of_stream
    finally:
        # Also runs when the client disconnects and the stream is cancelled: abort what is left.
        with anyio.CancelScope(shield=True):
            await close_all(generations)


async def collect_choices(generations: Sequence[Generation]) -> ChoiceResults:
    """What each completion produced, once all have finished."""
    results: ChoiceResults = {}
    prompt_logprobs: dict[int, list[TokenLogprobs | None]] = {}
    async for position, output in merge_outputs(generations):
        if output.prompt_logprobs is not None:
            prompt_logprobs.setdefault(position, output.prompt_logprobs)
        for completion in output.outputs:
            result = results.setdefault((position, completion.index), ChoiceResult())
            result.text_parts.append(completion.text)
            result.token_ids.extend(completion.token_ids)
            result.logprobs.extend(completion.logprobs or ())
            result.finish_reason = completion.finish_reason or result.finish_reason
            result.stop_reason = completion.stop_reason if completion.finished else result.stop_reason
    for (position, _), result in results.items():
        result.prompt_logprobs = prompt_logprobs.get(position)
    return results


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientDisconnected) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also on our own cancellation: neither task may outlive this call.
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()  # raises the work's own error, if it failed


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has already been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
