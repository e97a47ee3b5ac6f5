"""Where a request's outputs wait for its consumer. The engine side puts each step's delta; when the
consumer is behind (hundreds of streams on one event loop), the new delta is merged into the one still
waiting, so the consumer sends one larger delta instead of one per engine step and its per-delta cost
(SSE framing, JSON, socket writes) does not grow with the backlog."""

from __future__ import annotations

import asyncio

from batchlm.outputs import RequestOutput


class RequestOutputCollector:
    """One request's waiting output and, after it, the error that ends its stream. Event-loop only."""

    def __init__(self) -> None:
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        if self._output is None:
            self._output = output
        else:
            merge_into(self._output, output)
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        """End the stream with `error`, after the output already waiting (the first error stays)."""
        if self._error is None:
            self._error = error
        self._ready.set()

    async def get(self) -> RequestOutput:
        """Everything that arrived since the last call, as one delta; then the error, if any."""
        while self._output is None and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        output, self._output = self._output, None
        if output is not None:
            return output
        assert self._error is not None
        raise self._error


def merge_into(waiting: RequestOutput, later: RequestOutput) -> None:
    """Fold the delta `later` into the delta `waiting`, in place: per completion index, text, token ids
    and logprobs are appended; finish state and counters come from `later`. The output processor makes
    fresh outputs every step, so a waiting one belongs to its collector alone."""
    by_index = {completion.index: completion for completion in waiting.outputs}
    for completion in later.outputs:
        earlier = by_index.get(completion.index)
        if earlier is None:
            waiting.outputs.append(completion)
            continue
        earlier.text += completion.text
        earlier.token_ids += completion.token_ids
        if earlier.logprobs is None:
            earlier.logprobs = completion.logprobs
        elif completion.logprobs is not None:
            earlier.logprobs.extend(completion.logprobs)
        earlier.cumulative_logprob = completion.cumulative_logprob
        earlier.finish_reason, earlier.stop_reason = completion.finish_reason, completion.stop_reason
    if len(waiting.outputs) > len(by_index):
        waiting.outputs.sort(key=lambda completion: completion.index)
    waiting.finished = later.finished
    waiting.num_cached_tokens = max(waiting.num_cached_tokens, later.num_cached_tokens)
    waiting.metrics = later.metrics or waiting.metrics
    waiting.error = later.error or waiting.error
    if waiting.prompt_logprobs is None:
        waiting.prompt_logprobs = later.prompt_logprobs
    waiting.extra.update(later.extra)
