"""POST /v1/responses: OpenAI's Responses API over the chat path. The request is read as the chat
request it stands for (responses_input), runs as one, and its assistant message (thinking, text, tool
calls) is shaped as the response's output items; a stream sends Responses' typed events."""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from starlette.requests import Request
from starlette.responses import Response

from batchlm.engine.input_processor import CONTEXT_LENGTH_EXCEEDED, ValidatedRequest
from batchlm.outputs import CompletionOutput, FinishReason, RequestOutput
from batchlm.sampling_params import SamplingParams
from batchlm.server.errors import APIError
from batchlm.server.protocol_responses import (
    FunctionCallItem,
    ItemStatus,
    OutputItem,
    OutputMessage,
    OutputText,
    ReasoningItem,
    ReasoningText,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
)
from batchlm.server.responding import ChoiceResults, ResponseFormatter, json_text, respond
from batchlm.server.response_object import ResponseStatus, response_object
from batchlm.server.response_store import BatchedWrites, NewResponse
from batchlm.server.responses import ChatTokenLogprob, UsageInfo
from batchlm.server.responses_input import ChatForm, chat_form, input_items, item_references, with_references
from batchlm.server.serving_chat import AssistantMessages, ChatContext, prepare_chat
from batchlm.server.state import ServerState, get_state
from batchlm.server.stored_lookups import stored_conversation, stored_items
from batchlm.tools.calls import ToolCallDelta

logger = logging.getLogger(__name__)

# The event that carries a piece of each kind of item.
DELTA_EVENTS = {
    "message": "response.output_text.delta",
    "reasoning": "response.reasoning_text.delta",
    "function_call": "response.function_call_arguments.delta",
}


async def create_response(request: Request, body: ResponsesRequest) -> Response:
    state = get_state(request)
    body = with_references(body, await stored_items(state.responses, item_references(body)))
    form = chat_form(body, await stored_conversation(state.responses, body.previous_response_id))
    request_id = f"resp_{uuid.uuid4().hex}"
    try:
        with form.errors_renamed():
            engine_request, context = await prepare_chat(state, form.request, request_id)
    except APIError as too_long:
        if body.truncation != "auto" or too_long.code != CONTEXT_LENGTH_EXCEEDED:
            raise
        engine_request, context = await _truncated(state, form, request_id, too_long)
    store = state.responses.writes if state.responses is not None and body.store is not False else None
    formatter = ResponsesFormatter(context, body, engine_request.params, store)
    return await respond(request, [engine_request], formatter, body.stream)


async def _truncated(
    state: ServerState, form: ChatForm, request_id: str, too_long: APIError
) -> tuple[ValidatedRequest, ChatContext]:
    """`truncation: "auto"`: the conversation from the earliest place it may begin at (a user
    message, else an assistant one) where it fits the context, found by halving; `too_long` when none."""
    for cuts in form.truncation_cuts():
        fitting = None
        low, high = 0, len(cuts) - 1
        while low <= high:
            middle = (low + high) // 2
            try:
                fitting = await prepare_chat(state, form.dropping_until(cuts[middle]).request, request_id)
                high = middle - 1
            except APIError:  # too long still (or a template that cannot begin there)
                low = middle + 1
        if fitting is not None:
            return fitting
    raise too_long


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class _OpenItem:
    """The output item a stream is writing: its kind, id, place, and what it holds so far."""

    kind: Literal["message", "reasoning", "function_call"]
    id: str
    output_index: int
    parts: list[str] = field(default_factory=list)
    # A function call's id, name and the index the tool parser gave it.
    call_id: str = ""
    name: str = ""
    call_index: int = -1
    # Its delta event's bytes before the delta's text, and between it and the sequence number.
    delta_frame: tuple[str, str] | None = None
    # A message's tokens' log-probabilities, when they were asked for.
    logprobs: list[ChatTokenLogprob] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)


class ResponsesFormatter(ResponseFormatter[ChatContext]):
    """A response object, or its stream: response.created and .in_progress; per output item its added
    event, its content's deltas and done events; then response.completed (or .incomplete when
    max_output_tokens cut it short, .failed after an error event)."""

    end_of_stream = b""

    def __init__(
        self,
        context: ChatContext,
        body: ResponsesRequest,
        params: SamplingParams,
        store: BatchedWrites | None = None,
    ) -> None:
        super().__init__(context)
        self._body = body
        # Where the finished response is kept; None: it is not.
        self._store = store
        self._finished: ResponseObject | None = None
        # The response object at a stage: (status, output, usage, thinking tokens, error) -> object.
        self._response = partial(response_object, body, context, params, store is not None)
        self._messages = AssistantMessages(context)
        self._sequence = 0
        # A stream's finished items, and the one being written.
        self._items: list[OutputItem] = []
        self._open: _OpenItem | None = None
        self._cut_short = False
        # Log-probabilities of tokens whose text no message delta has carried yet (thinking, text the
        # tool parser holds back): they ride on the next one, as chat's do.
        self._pending_logprobs: list[ChatTokenLogprob] = []

    def choices(self, results: ChoiceResults) -> list[OutputItem]:
        """The output items of the (only) choice: its output read again in the deltas it came in, so
        that a response holds the items its stream would (text after calls in an item of its own)."""
        ((_, result),) = results.items()
        parts = result.text_parts or [""]
        for i, text in enumerate(parts):
            last = i == len(parts) - 1
            # The tokens' log-probabilities all at once: they ride on the message's first text, as a
            # stream's held ones do.
            delta = CompletionOutput(
                0,
                text,
                result.token_ids if i == 0 else [],
                logprobs=(result.logprobs or None) if i == 0 else None,
                finish_reason=(result.finish_reason or FinishReason.STOP) if last else None,
                stop_reason=result.stop_reason if last else None,
            )
            for _ in self.delta(0, RequestOutput(self.context.request_id, None, [], [delta], finished=last)):
                pass  # a stream's events; a response keeps the items they close
        return self._items

    def response(self, results: ChoiceResults, usage: UsageInfo) -> BaseModel:
        items = self.choices(results)
        thinking = self._messages.thinking_tokens(results)
        status: ResponseStatus = "incomplete" if self._cut_short else "completed"
        return self._kept(self._response(status, items, usage, thinking))

    def opening(self) -> Iterable[bytes]:
        snapshot = self._response("in_progress", [])
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def delta(self, position: int, output: RequestOutput) -> Iterator[bytes]:
        for completion in output.outputs:
            if completion.logprobs and (
                entries := self.context.logprobs(completion.token_ids, completion.logprobs)
            ):
                self._pending_logprobs += entries.content or []
            settled = self._messages.settle(completion)
            # A delta gives its text and call pieces apart, each piece saying how much of the text
            # came before it (the pieces that go on with the call being written, none).
            pieces = list(settled.tool_calls)
            while pieces and pieces[0].id is None and not pieces[0].after:
                yield from self._call_piece(pieces.pop(0))
            if settled.reasoning:
                yield from self._text("reasoning", settled.reasoning)
            text, sent = settled.content, 0
            for piece in pieces:
                if piece.after > sent:
                    yield from self._text("message", text[sent : piece.after])
                    sent = piece.after
                yield from self._call_piece(piece)
            if text[sent:]:
                yield from self._text("message", text[sent:])
            if completion.finish_reason is not None:
                self._cut_short = completion.finish_reason is FinishReason.LENGTH
                if self._open is None and not self._items:  # an empty answer is an empty message
                    yield from self._start("message")
                if self._open is not None and self._open.kind == "message":
                    self._open.logprobs += self._pending_logprobs
                self._pending_logprobs = []
                yield from self._close()

    def closing(self, usage: UsageInfo) -> Iterable[bytes]:
        status: ResponseStatus = "incomplete" if self._cut_short else "completed"
        thinking = self._messages.streamed_thinking_tokens()
        final = self._kept(self._response(status, self._items, usage, thinking))

        def events() -> Iterator[bytes]:  # written once settled: whether it was stored is known then
            yield self._event(f"response.{status}", response=final)

        return events()

    def failure(self, error: APIError) -> Iterable[bytes]:
        code = error.code or ("server_error" if error.status >= 500 else "invalid_request_error")
        # A response's error code is one of the few OpenAI defines (the error event keeps ours): what
        # fails a stream after it started is the server's side.
        failed = self._response("failed", self._items, error=ResponseError(message=error.message))
        return [
            self._event("error", code=code, message=error.message, param=error.param),
            self._event("response.failed", response=failed),
        ]

    def _kept(self, final: ResponseObject) -> ResponseObject:
        """The finished response, to be stored (by settle) when it is to be."""
        if self._store is not None:
            self._finished = final
        return final

    async def settle(self) -> None:
        """Store the finished response before its last event or body goes out (the client may name it
        next). A store that fails is logged: the answer still goes out, saying `"store": false` (it
        cannot be continued or read back)."""
        final = self._finished
        if self._store is not None and final is not None:
            body = self._body
            new = NewResponse(final.id, body.previous_response_id, input_items(body), final.model_dump_json())
            try:
                await self._store.put(new)
            except (sqlite3.Error, OSError) as error:  # a full disk, a lock held too long: said in a line
                logger.warning(
                    "response %s not stored (%s, in %s)", final.id, error, self._store.store.directory
                )
                final.store = False
            except Exception:
                logger.exception("storing response %s failed", final.id)
                final.store = False

    def _text(self, kind: Literal["message", "reasoning"], text: str) -> Iterator[bytes]:
        if self._open is None or self._open.kind != kind:
            yield from self._close()
            yield from self._start(kind)
        assert self._open is not None
        yield self._delta(text)

    def _start(self, kind: Literal["message", "reasoning"]) -> Iterator[bytes]:
        yield self._added(_OpenItem(kind, item_id("msg" if kind == "message" else "rs"), len(self._items)))
        part = OutputText(text="") if kind == "message" else ReasoningText(text="")
        yield self._event("response.content_part.added", **self._where(), part=part)

    def _call_piece(self, piece: ToolCallDelta) -> Iterator[bytes]:
        if piece.id is not None:
            yield from self._close()
            call = _OpenItem(
                "function_call", item_id("fc"), len(self._items), [], piece.id, piece.name or "", piece.index
            )
            yield self._added(call)
        assert self._open is not None and self._open.call_index == piece.index
        if piece.arguments:
            yield self._delta(piece.arguments)

    def _added(self, item: _OpenItem) -> bytes:
        self._open = item
        return self._event(
            "response.output_item.added", output_index=item.output_index, item=self._item("in_progress")
        )

    def _close(self) -> Iterator[bytes]:
        """The done events of the item being written, which joins the finished ones."""
        current = self._open
        if current is None:
            return
        status: ItemStatus = "incomplete" if self._cut_short or not self._call_read(current) else "completed"
        item = self._item(status)
        if current.kind == "function_call":
            yield self._event(
                "response.function_call_arguments.done",
                **self._where(),
                name=current.name,
                arguments=current.text,
            )
        elif current.kind == "message":
            yield self._event(
                "response.output_text.done", **self._where(), text=current.text, logprobs=current.logprobs
            )
            yield self._event(
                "response.content_part.done", **self._where(), part=OutputText(text=current.text)
            )
        else:
            yield self._event("response.reasoning_text.done", **self._where(), text=current.text)
            yield self._event(
                "response.content_part.done", **self._where(), part=ReasoningText(text=current.text)
            )
        yield self._event("response.output_item.done", output_index=current.output_index, item=item)
        self._items.append(item)
        self._open = None

    def _call_read(self, current: _OpenItem) -> bool:
        """False for a call whose markup stopped parsing (the output then shows it as text) or that the
        output ended inside: its item is "incomplete", as OpenAI marks an item the model did not
        finish, with the arguments sent of it. The response itself is not: the model ended it, and
        OpenAI's incomplete_details name only a response cut short (max_output_tokens) or filtered."""
        return current.kind != "function_call" or self._messages.call_reads(0, current.call_index)

    def _delta(self, text: str) -> bytes:
        """The delta event of the item being written (every streamed token makes one): the bytes _event
        would write, framed once per item around the text (tests pin the two equal)."""
        current = self._open
        assert current is not None
        current.parts.append(text)
        if current.kind == "message" and self._pending_logprobs:
            carried, self._pending_logprobs = self._pending_logprobs, []
            current.logprobs += carried
            return self._event(DELTA_EVENTS["message"], **self._where(), delta=text, logprobs=carried)
        if current.delta_frame is None:
            kind = DELTA_EVENTS[current.kind]
            head = json.dumps({"type": kind, **self._where()}, separators=(",", ":"))[:-1]
            logprobs = ',"logprobs":[]' if current.kind == "message" else ""
            current.delta_frame = (f'event: {kind}\ndata: {head},"delta":', f'{logprobs},"sequence_number":')
        head, tail = current.delta_frame
        self._sequence += 1
        return f"{head}{json_text(text)}{tail}{self._sequence - 1}}}\n\n".encode()

    def _where(self) -> dict[str, Any]:
        """Where an event of the item being written points: the item, and its one content part."""
        current = self._open
        assert current is not None
        where: dict[str, Any] = {"item_id": current.id, "output_index": current.output_index}
        if current.kind != "function_call":
            where["content_index"] = 0
        return where

    def _item(self, status: ItemStatus) -> OutputItem:
        """The item being written, as it stands."""
        current = self._open
        assert current is not None
        # An item just added holds nothing yet; a finished one, all it was given.
        text = None if status == "in_progress" else current.text
        if current.kind == "message":
            parts = [] if text is None else [OutputText(text=text, logprobs=current.logprobs)]
            return OutputMessage(id=current.id, status=status, content=parts)
        if current.kind == "reasoning":
            thinking = [] if text is None else [ReasoningText(text=text)]
            return ReasoningItem(id=current.id, status=status, content=thinking)
        return FunctionCallItem(
            id=current.id, status=status, call_id=current.call_id, name=current.name, arguments=text or ""
        )

    def _event(self, kind: str, **fields: Any) -> bytes:
        """One SSE event of the stream, named by its type and numbered in sequence."""
        payload = {"type": kind, **to_jsonable_python(fields)}
        payload["sequence_number"] = self._sequence
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()
