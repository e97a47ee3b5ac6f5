"""Where a request's outputs wait for its consumer. The engine side puts each step's delta; when the
consumer is behind (hundreds of streams on one event loop), the new delta is merged into the one still
waiting, so the consumer sends one larger delta instead of one per engine step and its per-delta cost
(SSE framing, JSON, socket writes) does not grow with the backlog."""

from __future__ import annotations

import asyncio

from batchlm.outputs import CompletionOutput, RequestOutput


class RequestOutputCollector:
    """One request's waiting output and, after it, the error that ends its stream. Event-loop only."""

    def __init__(self) -> None:
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        waiting = self._output
        self._output = output if waiting is None else merge_deltas(waiting, output)
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


def merge_deltas(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """One delta RequestOutput equivalent to `first` followed by `second` (per completion index:
    text, token ids and logprobs concatenated; finish state and counters from `second`)."""
    completions = {completion.index: completion for completion in first.outputs}
    for later in second.outputs:
        earlier = completions.get(later.index)
        completions[later.index] = later if earlier is None else _join(earlier, later)
    return RequestOutput(
        request_id=second.request_id,
        prompt=second.prompt,
        prompt_token_ids=second.prompt_token_ids,
        outputs=[completions[index] for index in sorted(completions)],
        finished=second.finished,
        num_cached_tokens=max(first.num_cached_tokens, second.num_cached_tokens),
        metrics=second.metrics or first.metrics,
        error=second.error or first.error,
        extra={**first.extra, **second.extra},
    )


def _join(earlier: CompletionOutput, later: CompletionOutput) -> CompletionOutput:
    logprobs = None
    if earlier.logprobs is not None or later.logprobs is not None:
        logprobs = (earlier.logprobs or []) + (later.logprobs or [])
    return CompletionOutput(
        index=later.index,
        text=earlier.text + later.text,
        token_ids=earlier.token_ids + later.token_ids,
        cumulative_logprob=later.cumulative_logprob,
        logprobs=logprobs,
        finish_reason=later.finish_reason,
        stop_reason=later.stop_reason,
    )
