"""POST /v1/completions: one or a batch of prompts (text or token ids) -> engine -> text_completion."""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from batchlm.engine.input_processor import ValidatedRequest
from batchlm.outputs import FinishReason, RequestOutput, TokenLogprobs
from batchlm.server.errors import APIError, rejections_as_400
from batchlm.server.logprobs import CompletionLogprobsBuilder, joined, prompt_logprobs
from batchlm.server.prompts import encode_text
from batchlm.server.protocol import CompletionRequest, PromptInput
from batchlm.server.request_params import build_sampling_params, check_completion_request
from batchlm.server.responding import (
    ChoiceResults,
    ResponseContext,
    ResponseFormatter,
    finish_reason,
    json_text,
    respond,
    system_fingerprint,
)
from batchlm.server.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    PromptLogprobs,
    UsageInfo,
)
from batchlm.server.state import get_state
from batchlm.server.validation import validated_requests
from batchlm.tokenizer.tokenizer import Tokenizer


@dataclass
class CompletionContext(ResponseContext):
    # Top log-probabilities per token (completions' `logprobs`), or None.
    logprobs: int | None
    # Per prompt, the text echoed before its completions ("" without echo).
    echo_texts: list[str]
    # Per prompt, its token ids when the echo carries their logprobs (echo with logprobs), else None.
    echoed_ids: list[list[int]] | None = None
    # `echo` with max_tokens 0 (the legacy way to score a prompt): the answer is the echo alone.
    echo_only: bool = False
    # Token ids the completions' text leaves out (skip_special_tokens): they take no place in it.
    hidden_ids: Collection[int] = frozenset()
    # vLLM's `prompt_logprobs` (alternatives per prompt token), or None; and each prompt's token ids.
    prompt_logprobs: int | None = None
    prompt_ids: list[list[int]] = field(default_factory=list)
    builders: dict[tuple[int, int], CompletionLogprobsBuilder] = field(default_factory=dict)

    def choice_index(self, position: int, index: int) -> int:
        # OpenAI orders a batch's choices prompt by prompt, n per prompt.
        return position * self.n + index

    def logprobs_of(
        self, position: int, index: int, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs]
    ) -> CompletionLogprobs | None:
        """These tokens' logprobs (None when not asked for), text offsets continuing the choice's."""
        if self.logprobs is None:
            return None
        key = (position, index)
        if key not in self.builders:
            offset = len(self.echo_texts[position])
            self.builders[key] = CompletionLogprobsBuilder(
                self.tokenizer, self.logprobs, offset, hidden=self.hidden_ids
            )
        return self.builders[key].add(token_ids, logprobs)

    def echoed_logprobs(
        self, position: int, prompt_logprobs: Sequence[TokenLogprobs | None] | None
    ) -> CompletionLogprobs | None:
        """The echoed prompt's logprobs (its first token has none), when they were asked and came."""
        if self.echoed_ids is None or self.logprobs is None or prompt_logprobs is None:
            return None
        builder = CompletionLogprobsBuilder(self.tokenizer, self.logprobs, spelled=self.echo_texts[position])
        return builder.add(self.echoed_ids[position], prompt_logprobs)

    def prompt_entries(
        self, position: int, scores: Sequence[TokenLogprobs | None] | None
    ) -> PromptLogprobs | None:
        """vLLM's `prompt_logprobs` of a prompt, when they were asked and came."""
        if self.prompt_logprobs is None or scores is None:
            return None
        return prompt_logprobs(self.tokenizer, self.prompt_ids[position], scores, self.prompt_logprobs)


async def create_completion(request: Request, body: CompletionRequest) -> Response:
    state = get_state(request)
    info = state.admit(body)
    check_completion_request(body)
    tokenizer, processor = state.engine.tokenizer, state.engine.input_processor
    # A prompt to be truncated cannot be judged by its length before it is tokenized.
    length_check = None if body.truncate_prompt_tokens else processor
    items = _batch_items(body.prompt)
    # Counted before any prompt is tokenized: a body of a million short prompts fits the size limit,
    # and handling each of them would hold the event loop for every other request.
    _check_batch_size(len(items), state.engine.most_requests_at_once())
    prompts = [
        (item, await encode_text(tokenizer, item, body.add_special_tokens, length_check))
        if isinstance(item, str)
        else (None, list(item))
        for item in items
    ]
    # The engine samples one token for an echo with max_tokens 0; the answer leaves it out.
    echo_only = body.echo and body.max_tokens == 0
    max_tokens = 1 if echo_only else body.max_tokens
    params, names = build_sampling_params(
        body,
        max_tokens=max_tokens,
        logprobs=body.logprobs,
        param_names={},
        prompt_field="prompt",
        defaults=info.sampling_defaults,
    )
    echo_logprobs = body.echo and body.logprobs is not None
    if echo_logprobs:  # the echoed prompt comes with its tokens' logprobs, as many as either field asks
        asked = max(body.logprobs or 0, body.prompt_logprobs or 0)
        params = params.clone(prompt_logprobs=asked)
        if body.prompt_logprobs is None:
            names = replace(names, prompt_logprobs="echo")
    # Every prompt is validated before any starts, so that a bad one fails the batch with nothing to undo.
    with rejections_as_400():
        engine_requests = await validated_requests(processor, prompts, params, names)
    context = CompletionContext(
        request_id=f"cmpl-{uuid.uuid4().hex}",
        model=info.served_model_name,
        system_fingerprint=system_fingerprint(info),
        tokenizer=tokenizer,
        n=body.n,
        logprobs=body.logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        echo_texts=[_echo_text(tokenizer, r) if body.echo else "" for r in engine_requests],
        echoed_ids=[r.prompt_token_ids for r in engine_requests] if echo_logprobs else None,
        prompt_logprobs=body.prompt_logprobs,
        prompt_ids=[r.prompt_token_ids for r in engine_requests],
        echo_only=echo_only,
        hidden_ids=tokenizer.skipped_special_ids
        if body.logprobs is not None and params.skip_special_tokens
        else frozenset(),
    )
    return await respond(request, engine_requests, CompletionFormatter(context), body.stream)


def _batch_items(prompt: PromptInput) -> list[Any]:
    """The batch's entries: a string or a flat list of ints is one prompt, not a batch."""
    items: list[Any] = (
        [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    )
    if not items:
        raise APIError(
            400, "The prompt is empty: send a string, a list of strings, or token ids.", param="prompt"
        )
    return items


def _check_batch_size(count: int, most: int | None) -> None:
    if most is not None and count > most:
        # A 429 would have the client retry a batch that can never be taken whole.
        raise APIError(
            400,
            f"{count} prompts in one request are more than this server holds at once "
            f"({most}: --batch-size plus --max-queue); send at most {most} a request",
            param="prompt",
        )


def _echo_text(tokenizer: Tokenizer, prompt: ValidatedRequest) -> str:
    if prompt.prompt is not None:
        return prompt.prompt
    return tokenizer.decode(prompt.prompt_token_ids, skip_special_tokens=False)


class CompletionFormatter(ResponseFormatter[CompletionContext]):
    """text_completion, or its chunks: the echoed prompts first, then text deltas (the last one carries
    the finish_reason), and with include_usage a last chunk with the usage and no choices."""

    # OpenAI uses one shape for both.
    chunk_type = response_type = CompletionResponse

    sample_choice = CompletionChoice(index=0, text="")

    def __init__(self, context: CompletionContext) -> None:
        super().__init__(context)
        # Prompts whose echo (with its logprobs, which come with the first output) is still to be sent.
        self._echo_pending = set(range(len(context.echo_texts))) if context.echoed_ids is not None else set()

    def choices(self, results: ChoiceResults) -> list[CompletionChoice]:
        context = self.context
        # A prompt's echo is the same in each of its n choices: its logprobs are built once.
        prompts = {position: result.prompt_logprobs for (position, _), result in results.items()}
        echoes = {position: context.echoed_logprobs(position, scores) for position, scores in prompts.items()}
        scored = {position: context.prompt_entries(position, scores) for position, scores in prompts.items()}
        choices = []
        for (position, index), result in sorted(results.items()):
            echoed = echoes[position]
            reason: str | None
            stop_reason = None
            if context.echo_only:
                text, logprobs, reason = context.echo_texts[position], echoed, FinishReason.LENGTH.value
            else:
                stop_reason = result.stop_reason
                text = context.echo_texts[position] + result.text
                logprobs = context.logprobs_of(position, index, result.token_ids, result.logprobs)
                logprobs = logprobs if echoed is None else joined(echoed, logprobs)
                reason = finish_reason(result.finish_reason, ends_in_calls=False)
            choices.append(
                CompletionChoice(
                    index=context.choice_index(position, index),
                    text=text,
                    logprobs=logprobs,
                    finish_reason=reason,
                    stop_reason=stop_reason,
                    prompt_logprobs=scored[position],
                )
            )
        return choices

    def response(self, results: ChoiceResults, usage: UsageInfo) -> BaseModel:
        return super().response(results, self._counted(usage))

    def closing(self, usage: UsageInfo) -> Iterable[bytes]:
        return super().closing(self._counted(usage))

    def _counted(self, usage: UsageInfo) -> UsageInfo:
        """The usage as the answer has it: an echo alone completed nothing."""
        if not self.context.echo_only:
            return usage
        return usage.model_copy(update={"completion_tokens": 0, "total_tokens": usage.prompt_tokens})

    def opening(self) -> Iterable[bytes]:
        return [
            event
            for position in range(len(self.context.echo_texts))
            if position not in self._echo_pending
            for event in self._echo(position, None)
        ]

    def _echo(self, position: int, logprobs: CompletionLogprobs | None) -> Iterator[bytes]:
        context = self.context
        text = context.echo_texts[position]
        if text:
            for i in range(context.n):
                choice = CompletionChoice(
                    index=context.choice_index(position, i), text=text, logprobs=logprobs
                )
                yield self._chunk([choice])

    def delta(self, position: int, output: RequestOutput) -> Iterator[bytes]:
        context = self.context
        if position in self._echo_pending and (output.prompt_logprobs is not None or output.finished):
            self._echo_pending.discard(position)
            yield from self._echo(position, context.echoed_logprobs(position, output.prompt_logprobs))
        if context.echo_only:  # no completion: each choice only finishes
            for completion in output.outputs:
                if completion.finish_reason is not None:
                    index = context.choice_index(position, completion.index)
                    yield self._text_chunk(index, "", FinishReason.LENGTH.value)
            return
        for completion in output.outputs:
            logprobs = None
            if completion.logprobs:
                index, ids = completion.index, completion.token_ids
                logprobs = context.logprobs_of(position, index, ids, completion.logprobs)
            if completion.text or logprobs or completion.finish_reason:
                index = context.choice_index(position, completion.index)
                reason = finish_reason(completion.finish_reason, ends_in_calls=False)
                if logprobs is None:
                    yield self._text_chunk(index, completion.text, reason, completion.stop_reason)
                    continue
                choice = CompletionChoice(
                    index=index,
                    text=completion.text,
                    logprobs=logprobs,
                    finish_reason=reason,
                    stop_reason=completion.stop_reason,
                )
                yield self._chunk([choice])

    def _text_chunk(
        self, index: int, text: str, reason: str | None, stop_reason: str | int | None = None
    ) -> bytes:
        reason_json = "null" if reason is None else f'"{reason}"'
        # null (the usual: looked up, not dumped), a token id or a string.
        stop_json = "null" if stop_reason is None else json.dumps(stop_reason, ensure_ascii=False)
        return self._framed_chunk(
            f'"index":{index},"text":{json_text(text)},"logprobs":null,"finish_reason":{reason_json},'
            f'"stop_reason":{stop_json}'
        )
