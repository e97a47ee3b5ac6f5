"""POST /v1/chat/completions: messages -> chat template -> engine -> chat.completion (or its chunks)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from batchlm.engine.client import ModelInfo
from batchlm.outputs import CompletionOutput, RequestOutput
from batchlm.sampling_params import SamplingParams
from batchlm.server.generation import Generation
from batchlm.server.logprobs import chat_logprobs
from batchlm.server.metrics import RequestRecorder
from batchlm.server.middleware import received_at
from batchlm.server.prompts import render_chat
from batchlm.server.protocol import ChatCompletionRequest
from batchlm.server.request_params import (
    build_sampling_params,
    check_chat_request,
    check_model,
    check_n,
    resolve_max_tokens,
)
from batchlm.server.responding import (
    ChunkFormatter,
    ResponseContext,
    collect_choices,
    respond_json,
    start_stream,
    usage_of,
)
from batchlm.server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatResponseMessage,
)
from batchlm.server.state import get_state


@dataclass
class ChatContext(ResponseContext):
    # Top log-probabilities per token, or None when logprobs were not asked for.
    top_logprobs: int | None


async def create_chat_completion(request: Request, body: ChatCompletionRequest) -> Response:
    state = get_state(request)
    info = state.ready_model()
    check_model(body.model, info)
    check_n(body.n, state.settings.max_n)
    check_chat_request(body)
    tokenizer = state.engine.tokenizer
    prompt_ids = await render_chat(
        tokenizer,
        body.messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        chat_template_kwargs=body.chat_template_kwargs,
        max_model_len=info.max_model_len,
    )
    params = _sampling_params(body, len(prompt_ids), info)
    context = ChatContext(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=info.served_model_name,
        tokenizer=tokenizer,
        n=body.n,
        top_logprobs=params.logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )
    recorder = RequestRecorder(state.metrics, context.request_id, len(prompt_ids), received_at(request))
    generation = Generation(state.engine, context.request_id, prompt_ids, params, recorder, state.in_flight)
    if body.stream:
        return await start_stream(request, [generation], ChatStreamFormatter(context), state.metrics)
    return await respond_json(request, [generation], lambda: _full_response(context, generation))


def _sampling_params(body: ChatCompletionRequest, prompt_len: int, info: ModelInfo) -> SamplingParams:
    # max_completion_tokens replaced the deprecated max_tokens; errors name whichever the client sent.
    budget_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return build_sampling_params(
        body,
        max_tokens=resolve_max_tokens(requested, prompt_len, info.max_model_len, "messages"),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        vocab_size=info.vocab_size,
        param_names={"logprobs": "top_logprobs", "max_tokens": budget_field},
    )


async def _full_response(context: ChatContext, generation: Generation) -> ChatCompletionResponse:
    results = await collect_choices([generation])
    choices = []
    for (_, index), result in sorted(results.items()):
        logprobs = None
        if context.top_logprobs is not None:
            logprobs = chat_logprobs(
                context.tokenizer, result.token_ids, result.logprobs, context.top_logprobs
            )
        choices.append(
            ChatChoice(
                index=index,
                message=ChatResponseMessage(content=result.text),
                logprobs=logprobs,
                finish_reason=result.finish_reason,
            )
        )
    return ChatCompletionResponse(
        id=context.request_id,
        created=context.created,
        model=context.model,
        choices=choices,
        usage=usage_of([generation]),
    )


class ChatStreamFormatter(ChunkFormatter):
    """chat.completion.chunk events: a role chunk per choice, content deltas, a finish chunk per choice,
    and with include_usage a last chunk with the usage and no choices."""

    chunk_type = ChatCompletionChunk

    def __init__(self, context: ChatContext) -> None:
        super().__init__(context)
        self._context = context

    def opening(self) -> Iterable[bytes]:
        role = {"role": "assistant", "content": ""}
        return [self._chunk([ChatChunkChoice(index=i, delta=dict(role))]) for i in range(self._context.n)]

    def delta(self, position: int, output: RequestOutput) -> Iterator[bytes]:
        for completion in output.outputs:
            if completion.text or completion.logprobs:
                yield self._chunk([self._content_choice(completion)])
            if completion.finish_reason is not None:
                finish = ChatChunkChoice(
                    index=completion.index, delta={}, finish_reason=completion.finish_reason
                )
                yield self._chunk([finish])

    def _content_choice(self, completion: CompletionOutput) -> ChatChunkChoice:
        logprobs = None
        top = self._context.top_logprobs
        if top is not None and completion.logprobs:
            logprobs = chat_logprobs(self._context.tokenizer, completion.token_ids, completion.logprobs, top)
        return ChatChunkChoice(index=completion.index, delta={"content": completion.text}, logprobs=logprobs)
