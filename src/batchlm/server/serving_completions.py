"""POST /v1/completions: one or a batch of prompts (text or token ids) -> engine -> text_completion."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from batchlm.engine.client import ModelInfo
from batchlm.outputs import RequestOutput
from batchlm.server.errors import APIError
from batchlm.server.generation import Generation
from batchlm.server.logprobs import CompletionLogprobsBuilder
from batchlm.server.metrics import RequestRecorder
from batchlm.server.middleware import received_at
from batchlm.server.prompts import encode_text
from batchlm.server.protocol import CompletionRequest, PromptInput
from batchlm.server.request_params import (
    build_sampling_params,
    check_completion_request,
    check_model,
    check_n,
    check_prompt_token_ids,
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
from batchlm.server.responses import CompletionChoice, CompletionResponse
from batchlm.server.state import ServerState, get_state
from batchlm.server.streams import close_all


@dataclass(frozen=True)
class Prompt:
    text: str | None
    token_ids: list[int]


@dataclass
class CompletionContext(ResponseContext):
    # Top log-probabilities per token (completions' `logprobs`), or None.
    logprobs: int | None
    # Per prompt, the text echoed before its completions ("" without echo).
    echo_texts: list[str]
    builders: dict[tuple[int, int], CompletionLogprobsBuilder] = field(default_factory=dict)

    def choice_index(self, position: int, index: int) -> int:
        # OpenAI orders a batch's choices prompt by prompt, n per prompt.
        return position * self.n + index

    def builder(self, position: int, index: int) -> CompletionLogprobsBuilder:
        key = (position, index)
        if key not in self.builders:
            offset = len(self.echo_texts[position])
            self.builders[key] = CompletionLogprobsBuilder(self.tokenizer, self.logprobs or 0, offset)
        return self.builders[key]


async def create_completion(request: Request, body: CompletionRequest) -> Response:
    state = get_state(request)
    info = state.ready_model()
    check_model(body.model, info)
    check_n(body.n, state.settings.max_n)
    check_completion_request(body)
    tokenizer = state.engine.tokenizer
    prompts = await _tokenize_prompts(tokenizer, body.prompt, body.add_special_tokens, info)
    context = CompletionContext(
        request_id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=info.served_model_name,
        tokenizer=tokenizer,
        n=body.n,
        logprobs=body.logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        echo_texts=[_echo_text(tokenizer, p) if body.echo else "" for p in prompts],
    )
    generations = await _start_generations(state, info, body, prompts, context.request_id, received_at(request))
    if body.stream:
        return await start_stream(request, generations, CompletionStreamFormatter(context), state.metrics)

    return await respond_json(request, generations, lambda: _full_response(context, generations))


async def _tokenize_prompts(
    tokenizer: Any, prompt: PromptInput, add_special_tokens: bool, info: ModelInfo
) -> list[Prompt]:
    """One Prompt per batch entry. A flat list of ints is one token-id prompt, not a batch."""
    items: list[Any] = (
        [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    )
    if not items:
        raise APIError(
            400, "The prompt is empty: send a string, a list of strings, or token ids.", param="prompt"
        )
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = await encode_text(tokenizer, item, add_special_tokens, info.max_model_len)
            prompts.append(Prompt(item, ids))
        else:
            prompts.append(Prompt(None, list(item)))
        # The context check first: it is O(1), and a prompt that cannot fit is refused before its ids
        # are range-checked or decoded for echo (both as long as the prompt, on the event loop).
        resolve_max_tokens(None, len(prompts[-1].token_ids), info.max_model_len, "prompt")
        check_prompt_token_ids(prompts[-1].token_ids, info.vocab_size, "prompt")
    return prompts


def _echo_text(tokenizer: Any, prompt: Prompt) -> str:
    if prompt.text is not None:
        return prompt.text
    text: str = tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
    return text


async def _start_generations(
    state: ServerState,
    info: ModelInfo,
    body: CompletionRequest,
    prompts: list[Prompt],
    request_id: str,
    http_received_at: float | None,
) -> list[Generation]:
    # Validate every prompt before starting any, so that a bad one fails the batch with nothing to undo.
    plans = []
    for prompt in prompts:
        max_tokens = resolve_max_tokens(body.max_tokens, len(prompt.token_ids), info.max_model_len, "prompt")
        params = build_sampling_params(
            body, max_tokens=max_tokens, logprobs=body.logprobs, vocab_size=info.vocab_size, param_names={}
        )
        plans.append((prompt, params))
    generations: list[Generation] = []
    # A batch's prompts take admission turns as one request (like n), not one turn each.
    group_id = request_id if len(plans) > 1 else ""
    try:
        for position, (prompt, params) in enumerate(plans):
            engine_id = request_id if len(plans) == 1 else f"{request_id}-{position}"
            recorder = RequestRecorder(state.metrics, engine_id, len(prompt.token_ids), http_received_at)
            generation = Generation(
                state.engine, engine_id, prompt.token_ids, params, recorder, state.in_flight, prompt.text, group_id
            )
            generations.append(generation)
    except BaseException:
        await close_all(generations)
        raise
    return generations


async def _full_response(context: CompletionContext, generations: list[Generation]) -> CompletionResponse:
    results = await collect_choices(generations)
    choices = []
    for (position, index), result in sorted(results.items()):
        logprobs = None
        if context.logprobs is not None:
            logprobs = context.builder(position, index).add(result.token_ids, result.logprobs)
        choices.append(
            CompletionChoice(
                index=context.choice_index(position, index),
                text=context.echo_texts[position] + result.text,
                logprobs=logprobs,
                finish_reason=result.finish_reason,
            )
        )
    return CompletionResponse(
        id=context.request_id,
        created=context.created,
        model=context.model,
        choices=choices,
        usage=usage_of(generations),
    )


class CompletionStreamFormatter(ChunkFormatter):
    """text_completion chunks: the echoed prompts first, then text deltas (the last one carries the
    finish_reason), and with include_usage a last chunk with the usage and no choices."""

    chunk_type = CompletionResponse

    def __init__(self, context: CompletionContext) -> None:
        super().__init__(context)
        self._context = context

    def opening(self) -> Iterable[bytes]:
        context = self._context
        return [
            self._chunk([CompletionChoice(index=context.choice_index(position, i), text=text)])
            for position, text in enumerate(context.echo_texts)
            if text
            for i in range(context.n)
        ]

    def delta(self, position: int, output: RequestOutput) -> Iterator[bytes]:
        context = self._context
        for completion in output.outputs:
            logprobs = None
            if context.logprobs is not None and completion.logprobs:
                logprobs = context.builder(position, completion.index).add(
                    completion.token_ids, completion.logprobs
                )
            if completion.text or logprobs or completion.finish_reason:
                choice = CompletionChoice(
                    index=context.choice_index(position, completion.index),
                    text=completion.text,
                    logprobs=logprobs,
                    finish_reason=completion.finish_reason,
                )
                yield self._chunk([choice])
