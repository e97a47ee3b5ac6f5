"""POST /v1/chat/completions: messages -> chat template -> engine -> chat.completion (or its chunks)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from batchlm.engine.chat_messages import final_message_text
from batchlm.engine.input_processor import FieldNames, ValidatedRequest
from batchlm.outputs import CompletionOutput, FinishReason, RequestOutput, TokenLogprobs
from batchlm.reasoning.message import AssistantMessage, MessageDelta, MessageReader, MessageStream
from batchlm.reasoning.registry import reasoning_parser
from batchlm.reasoning.split import ReasoningParser
from batchlm.sampling_defaults import SamplingDefaults
from batchlm.sampling_params import SamplingParams
from batchlm.server.errors import rejections_as_400
from batchlm.server.logprobs import chat_logprobs, prompt_logprobs
from batchlm.server.prompts import render_chat, template_for, template_kwargs_of
from batchlm.server.protocol import ChatCompletionRequest
from batchlm.server.request_params import build_sampling_params, check_chat_request
from batchlm.server.responding import (
    ChoiceResult,
    ChoiceResults,
    ResponseContext,
    ResponseFormatter,
    finish_reason,
    json_text,
    respond,
    system_fingerprint,
)
from batchlm.server.responses import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionTokensDetails,
    ResponseFunctionCall,
    ResponseToolCall,
    UsageInfo,
)
from batchlm.server.state import ServerState, get_state
from batchlm.server.validation import validated_requests
from batchlm.tools.calls import ToolCall, ToolCallDelta
from batchlm.tools.use import chat_tool_use, template_tools, tool_prompt

# The prompt's last tokens, whose text says whether the template opened a thinking block.
PROMPT_TAIL_TOKENS = 8


@dataclass
class ChatContext(ResponseContext):
    # Top log-probabilities per token, or None when logprobs were not asked for.
    top_logprobs: int | None
    # Reads thinking and tool calls out of each choice's output; None: the output is all content.
    reader: MessageReader | None
    # What each choice's content starts with: the assistant message it continues, for vLLM's `echo`.
    echoed: str = ""
    # vLLM's `prompt_logprobs` (alternatives per prompt token), or None; and the prompt's token ids.
    prompt_logprobs: int | None = None
    prompt_ids: Sequence[int] = ()

    def logprobs(
        self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs]
    ) -> ChatChoiceLogprobs | None:
        """These tokens' entries, or None when logprobs were not asked for."""
        top = self.top_logprobs
        return None if top is None else chat_logprobs(self.tokenizer, token_ids, logprobs, top)


async def create_chat_completion(request: Request, body: ChatCompletionRequest) -> Response:
    engine_request, context = await prepare_chat(get_state(request), body, f"chatcmpl-{uuid.uuid4().hex}")
    return await respond(request, [engine_request], ChatFormatter(context), body.stream)


async def prepare_chat(
    state: ServerState, body: ChatCompletionRequest, request_id: str
) -> tuple[ValidatedRequest, ChatContext]:
    """The engine request of a chat request (prompt rendered with its tools, sampling parameters with
    its constraint, validated) and what its answer is read and shaped with."""
    info = state.admit(body)
    check_chat_request(body)
    tokenizer, processor = state.engine.tokenizer, state.engine.input_processor
    chat_template = template_for(tokenizer, bool(body.tools))
    added_tokens = getattr(tokenizer, "added_tokens", None) or {}
    template_kwargs = template_kwargs_of(state, body, chat_template)
    with rejections_as_400():
        # The ids a text without special tokens leaves out: call markers among them must stay in it.
        hidden_ids: Collection[int] = tokenizer.skipped_special_ids if body.tools else ()
        tool_args = (body, state.settings.tool_call_parser, chat_template, added_tokens, hidden_ids)
        # Tools may carry large schemas that are compiled to check them: off the event loop.
        tool_use = (
            await asyncio.to_thread(chat_tool_use, *tool_args) if body.tools else chat_tool_use(*tool_args)
        )
        prompt_ids = await render_chat(
            tokenizer,
            body.messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            chat_template_kwargs=template_kwargs,
            processor=None if body.truncate_prompt_tokens else processor,
            tools=template_tools(tool_use.plan),
            tool_prompt=tool_prompt(tool_use.plan),
        )
        reasoning = reasoning_parser(
            state.settings.reasoning_parser,
            chat_template,
            lambda: tokenizer.decode(prompt_ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False),
            final_message_text(body.messages) if body.continue_final_message else None,
            added_tokens,
            lambda: tokenizer.skipped_special_ids,
        )
        params, names = _sampling_params(body, info.sampling_defaults)
        params = tool_use.sampling_params(params, names.structured_outputs, reasoning)
        [engine_request] = await validated_requests(processor, [(None, prompt_ids)], params, names)
    context = ChatContext(
        request_id=request_id,
        model=info.served_model_name,
        system_fingerprint=system_fingerprint(info),
        tokenizer=tokenizer,
        n=body.n,
        top_logprobs=engine_request.params.logprobs,
        reader=MessageReader(reasoning, tool_use.parser) if reasoning or tool_use.parser else None,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        # vLLM's `echo`: the reply starts with the last message when it is the assistant's.
        echoed=final_message_text(body.messages)
        if body.echo and body.messages[-1].role == "assistant"
        else "",
        prompt_logprobs=body.prompt_logprobs,
        prompt_ids=engine_request.prompt_token_ids,
    )
    return engine_request, context


def _sampling_params(
    body: ChatCompletionRequest, defaults: SamplingDefaults
) -> tuple[SamplingParams, FieldNames]:
    # max_completion_tokens replaced the deprecated max_tokens; errors name whichever the client sent.
    budget_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return build_sampling_params(
        body,
        max_tokens=requested,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        param_names={"logprobs": "top_logprobs", "max_tokens": budget_field},
        prompt_field="messages",
        defaults=defaults,
    )


def _cut_short(reason: FinishReason | None, stop_reason: str | int | None) -> bool:
    """Whether the output ended before the model ended it: at max_tokens, or at one of the client's stop
    strings (a call it was writing is then cut off, not text to show)."""
    return reason is FinishReason.LENGTH or isinstance(stop_reason, str)


class AssistantMessages:
    """Each choice's assistant message (thinking, content, tool calls) read out of its text: whole for
    a response, settled piece by piece for a stream; and the tokens it spent thinking, for the usage."""

    def __init__(self, context: ChatContext) -> None:
        self._reader = context.reader
        self._tokenizer = context.tokenizer
        self._count_streamed = context.include_usage and self._reasoning is not None
        self._streams: dict[int, MessageStream] = {}
        # Per streamed choice of a reasoning model, when its usage is reported: its token ids.
        self._streamed_ids: dict[int, list[int]] = {}

    @property
    def _reasoning(self) -> ReasoningParser | None:
        return self._reader.reasoning if self._reader is not None else None

    def whole(self, result: ChoiceResult) -> AssistantMessage:
        if self._reader is None:
            return AssistantMessage(None, result.text, ())
        return self._reader.read(result.text, cut_short=_cut_short(result.finish_reason, result.stop_reason))

    def settle(self, completion: CompletionOutput) -> MessageDelta:
        """What this delta of the choice settles (with the rest of the message once it finishes)."""
        if self._reader is None:
            return MessageDelta("", completion.text, ())
        stream = self._streams.get(completion.index)
        if stream is None:
            stream = self._streams[completion.index] = self._reader.stream()
        if self._count_streamed:
            self._streamed_ids.setdefault(completion.index, []).extend(completion.token_ids)
        settled = stream.feed(completion.text)
        if completion.finish_reason is None:
            return settled
        return settled.then(
            stream.finish(cut_short=_cut_short(completion.finish_reason, completion.stop_reason))
        )

    def ends_in_calls(self, index: int) -> bool:
        """Whether the streamed choice made calls, none of them cut off."""
        stream = self._streams.get(index)
        return stream is not None and stream.ends_in_calls

    def call_reads(self, index: int, call_index: int) -> bool:
        """Whether the streamed choice's call reads as one so far (whole, once the choice finished)."""
        stream = self._streams.get(index)
        return stream is not None and stream.call_reads(call_index)

    def thinking_tokens(self, results: ChoiceResults) -> int:
        return sum(self._thinking(result.token_ids) for result in results.values())

    def streamed_thinking_tokens(self) -> int:
        return sum(self._thinking(ids) for ids in self._streamed_ids.values())

    def _thinking(self, token_ids: Sequence[int]) -> int:
        parser = self._reasoning
        if parser is None:
            return 0
        tokenizer, skip_special = self._tokenizer, not parser.keeps_special_tokens
        return parser.thinking_tokens(
            token_ids, lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special)
        )


class ChatFormatter(ResponseFormatter[ChatContext]):
    """chat.completion, or its chunks: a role chunk per choice, content deltas, a finish chunk per
    choice, and with include_usage a last chunk with the usage and no choices."""

    chunk_type = ChatCompletionChunk
    response_type = ChatCompletionResponse
    sample_choice = ChatChunkChoice(index=0, delta={})

    def __init__(self, context: ChatContext) -> None:
        super().__init__(context)
        self._messages = AssistantMessages(context)
        # Per choice: log-probabilities of text its message stream holds back.
        self._held_logprobs: dict[int, ChatChoiceLogprobs] = {}

    def choices(self, results: ChoiceResults) -> list[ChatChoice]:
        return [self._choice(index, result) for (_, index), result in sorted(results.items())]

    def response(self, results: ChoiceResults, usage: UsageInfo) -> BaseModel:
        thinking = self._messages.thinking_tokens(results)
        response = super().response(results, _with_reasoning_tokens(usage, thinking))
        context = self.context
        scores = next((r.prompt_logprobs for r in results.values() if r.prompt_logprobs is not None), None)
        if context.prompt_logprobs is not None and scores is not None:
            # vLLM's place for them: the response's, the n choices sharing one prompt.
            assert isinstance(response, ChatCompletionResponse)
            response.prompt_logprobs = prompt_logprobs(
                context.tokenizer, context.prompt_ids, scores, context.prompt_logprobs
            )
        return response

    def closing(self, usage: UsageInfo) -> Iterable[bytes]:
        thinking = self._messages.streamed_thinking_tokens()
        return super().closing(_with_reasoning_tokens(usage, thinking))

    def _choice(self, index: int, result: ChoiceResult) -> ChatChoice:
        parsed = self._messages.whole(result)
        echoed = self.context.echoed
        message = ChatResponseMessage(
            content=echoed + (parsed.content or "") if echoed else parsed.content,
            tool_calls=response_tool_calls(parsed.tool_calls),
            reasoning_content=parsed.reasoning,
        )
        return ChatChoice(
            index=index,
            message=message,
            logprobs=self.context.logprobs(result.token_ids, result.logprobs),
            finish_reason=finish_reason(result.finish_reason, parsed.ends_in_calls),
            stop_reason=result.stop_reason,
        )

    def opening(self) -> Iterable[bytes]:
        # A reply that may have no content (calls alone, thinking alone) starts with none: null, as OpenAI
        # streams calls. A client adding up the deltas then gets the message the response would be.
        role = {"role": "assistant", "content": None if self.context.reader is not None else ""}
        chunks = [self._chunk([ChatChunkChoice(index=i, delta=dict(role))]) for i in range(self.context.n)]
        if self.context.echoed:  # after the role chunks, as vLLM sends it
            echo = {"content": self.context.echoed}
            chunks += [
                self._chunk([ChatChunkChoice(index=i, delta=dict(echo))]) for i in range(self.context.n)
            ]
        return chunks

    def delta(self, position: int, output: RequestOutput) -> Iterator[bytes]:
        for completion in output.outputs:
            if self.context.reader is not None:
                yield from self._read_deltas(completion)
            elif completion.text or completion.logprobs:
                logprobs = self._delta_logprobs(completion)
                yield self._text_chunk(completion.index, "content", completion.text, logprobs)
            if completion.finish_reason is not None:
                reason = finish_reason(
                    completion.finish_reason, self._messages.ends_in_calls(completion.index)
                )
                held = self._held_logprobs.pop(completion.index, None)
                finish = ChatChunkChoice(
                    index=completion.index,
                    delta={},
                    logprobs=held,
                    finish_reason=reason,
                    stop_reason=completion.stop_reason,
                )
                yield self._chunk([finish])

    def _read_deltas(self, completion: CompletionOutput) -> Iterator[bytes]:
        """Thinking, content and call pieces the reader settles; log-probabilities ride on the next
        piece sent."""
        settled = self._messages.settle(completion)
        logprobs = self._merge_held(completion.index, self._delta_logprobs(completion))
        texts = [("reasoning_content", settled.reasoning), ("content", settled.content)]
        for key, text in texts:
            if text:
                yield self._text_chunk(completion.index, key, text, logprobs)
                logprobs = None
        for piece in settled.tool_calls:
            delta = {"tool_calls": [delta_tool_call(piece)]}
            yield self._chunk([ChatChunkChoice(index=completion.index, delta=delta, logprobs=logprobs)])
            logprobs = None
        if logprobs is not None:
            self._held_logprobs[completion.index] = logprobs

    def _merge_held(self, index: int, logprobs: ChatChoiceLogprobs | None) -> ChatChoiceLogprobs | None:
        held = self._held_logprobs.pop(index, None)
        if held is None or logprobs is None:
            return held or logprobs
        return ChatChoiceLogprobs(content=(held.content or []) + (logprobs.content or []))

    def _delta_logprobs(self, completion: CompletionOutput) -> ChatChoiceLogprobs | None:
        return (
            self.context.logprobs(completion.token_ids, completion.logprobs) if completion.logprobs else None
        )

    def _text_chunk(self, index: int, key: str, text: str, logprobs: ChatChoiceLogprobs | None) -> bytes:
        """A delta of content or thinking alone; without log-probabilities (every streamed token's
        case) written around the pydantic chunk's bytes."""
        if logprobs is not None:
            return self._chunk([ChatChunkChoice(index=index, delta={key: text}, logprobs=logprobs)])
        delta = f'{{"{key}":{json_text(text)}}}'
        return self._framed_chunk(
            f'"index":{index},"delta":{delta},"logprobs":null,"finish_reason":null,"stop_reason":null'
        )


def _with_reasoning_tokens(usage: UsageInfo, thinking: int) -> UsageInfo:
    if not thinking:
        return usage
    return usage.model_copy(
        update={"completion_tokens_details": CompletionTokensDetails(reasoning_tokens=thinking)}
    )


def response_tool_calls(calls: tuple[ToolCall, ...]) -> list[ResponseToolCall] | None:
    if not calls:
        return None
    return [
        ResponseToolCall(id=c.id, function=ResponseFunctionCall(name=c.name, arguments=c.arguments))
        for c in calls
    ]


def delta_tool_call(delta: ToolCallDelta) -> dict[str, Any]:
    """One streamed call piece as OpenAI sends it: index, id, type and name first; then arguments."""
    if delta.id is None:
        return {"index": delta.index, "function": {"arguments": delta.arguments}}
    function = {"name": delta.name, "arguments": delta.arguments}
    return {"index": delta.index, "id": delta.id, "type": "function", "function": function}
