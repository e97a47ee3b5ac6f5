"""The request-routing half shared by every EngineClient: validation, admission limits, one asyncio queue
per request fed by the detokenizing OutputProcessor, an inbox for what the engine's thread reports,
aborts on disconnect, and failing open streams when the engine stops. Subclasses only say how core
requests and aborts reach their engine and what its other messages mean."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from abc import abstractmethod
from collections.abc import AsyncIterator
from typing import Any, Protocol

from batchlm.config import EngineConfig
from batchlm.engine.client import EngineClient, EngineDeadError, QueueFullError, RequestRejectedError
from batchlm.engine.output_processor import OutputProcessor
from batchlm.engine.requests import make_core_requests, validate_request
from batchlm.outputs import CompletionOutput, EngineCoreOutput, RequestOutput
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Step outputs are handed to the streams at most once per this interval times the number of open
# streams (up to MAX_DRAIN_INTERVAL_S). One stream sees every step at once; hundreds of streams get a
# few steps' tokens per delta, which bounds the event loop's per-delta work (detokenizing, SSE
# framing, socket writes) and leaves it time to take in new requests.
DRAIN_INTERVAL_PER_STREAM_S = 50e-6
MAX_DRAIN_INTERVAL_S = 0.02


class EngineLimits(Protocol):
    """What request validation needs from the started engine."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...


class StreamingFrontEnd(EngineClient):
    """All state here is touched only on the event loop's thread; the engine's thread hands its
    messages over with _post_threadsafe and they are handled, in order, on the loop."""

    def __init__(self, config: EngineConfig, max_queue: int | None) -> None:
        self.config = config
        self.max_queue = max_queue
        self._processor: OutputProcessor | None = None
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._ready = False
        self._dead_reason: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Messages from the engine's thread, drained on the event loop (see _drain_inbox).
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._inbox_lock = threading.Lock()
        self._inbox_drain_pending = False
        self._last_drain = 0.0

    # -- what a subclass provides --------------------------------------------------------------------

    @property
    @abstractmethod
    def _limits(self) -> EngineLimits | None:
        """The started engine's limits; None until it is up."""

    @abstractmethod
    def _send_requests(self, core_requests: list[EngineCoreRequest]) -> bool:
        """Hand new core requests to the engine; False when there is no engine to take them."""

    @abstractmethod
    def _send_abort(self, core_ids: list[str]) -> None:
        """Ask the engine to drop these core requests (it may already have finished them)."""

    @abstractmethod
    def _record_stats(self, stats: Any) -> None:
        """Keep the engine's stats snapshot that came with a step's outputs."""

    @abstractmethod
    def _on_message(self, kind: str, payload: Any) -> None:
        """Handle an engine message other than "outputs" (on the event loop)."""

    def _open_streams(self) -> int:
        """Streams the delta cadence is set for (see DRAIN_INTERVAL_PER_STREAM_S): this front end's."""
        return len(self._queues)

    # -- EngineClient ----------------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._ready and self._dead_reason is None

    @property
    def is_dead(self) -> bool:
        return self._dead_reason is not None

    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
        group_id: str = "",
    ) -> AsyncIterator[RequestOutput]:
        queue = self._submit(prompt_token_ids, sampling_params, request_id, prompt, group_id)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                item, error = _coalesce_waiting(item, queue)
                finished = item.finished
                yield item
                if error is not None:
                    raise error
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(asyncio.CancelledError())

    # -- shared internals ------------------------------------------------------------------------------

    def _submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        prompt: str | None,
        group_id: str = "",
    ) -> asyncio.Queue[Any]:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        limits = self._limits
        if not self._ready or limits is None or self._processor is None:
            raise EngineDeadError("the engine is still loading")
        params = validate_request(prompt_token_ids, params, limits.max_model_len, limits.vocab_size)
        if request_id in self._queues or self._processor.has_request(request_id):
            raise RequestRejectedError(f"request id {request_id!r} is already in use", "request_id")
        self._check_queue_room()
        now = time.time()
        core_requests = make_core_requests(
            request_id, prompt_token_ids, params, self.tokenizer.eos_token_ids, now, group_id
        )
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[request_id] = queue
        self._processor.add_request(request_id, prompt, prompt_token_ids, params, now)
        self._prompt_tokens_total += len(prompt_token_ids)
        if not self._send_requests(core_requests):
            self._queues.pop(request_id, None)
            self._processor.abort_request(request_id)
            raise EngineDeadError("the engine is not running")
        return queue

    def _check_queue_room(self) -> None:
        if self.max_queue is None:
            return
        waiting = len(self._queues) - self.config.max_num_seqs
        if waiting >= self.max_queue:
            raise QueueFullError(
                f"the server is overloaded: {waiting} requests are already waiting (--max-queue "
                f"{self.max_queue}); retry later"
            )

    def _abort_now(self, request_id: str) -> None:
        if self._processor is None:
            return
        core_ids = self._processor.core_ids_of(request_id)
        self._processor.abort_request(request_id)
        if core_ids and self._dead_reason is None:
            self._send_abort(core_ids)

    def _post_threadsafe(self, kind: str, payload: Any) -> bool:
        """Called on the engine's thread: queue a message for the event loop. An "outputs" payload
        is (EngineCoreOutputs, stats). False when the loop is closed (nobody is listening any more)."""
        assert self._loop is not None
        with self._inbox_lock:
            self._inbox.append((kind, payload))
            wake = not self._inbox_drain_pending
            self._inbox_drain_pending = True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._drain_inbox)
            except RuntimeError:
                return False
        return True

    def _drain_inbox(self) -> None:
        """Handle, in order, every message that arrived since the last drain. Consecutive step outputs
        are processed as one batch: when the loop falls behind the engine (hundreds of streams), each
        request then gets one detokenized delta for all its new tokens instead of one per step."""
        interval = min(MAX_DRAIN_INTERVAL_S, DRAIN_INTERVAL_PER_STREAM_S * self._open_streams())
        if interval > 0:
            assert self._loop is not None
            now = self._loop.time()
            if now < self._last_drain + interval:
                # Still pending: the engine's thread does not schedule another drain meanwhile.
                self._loop.call_at(self._last_drain + interval, self._drain_inbox)
                return
            self._last_drain = now
        with self._inbox_lock:
            messages = list(self._inbox)
            self._inbox.clear()
            self._inbox_drain_pending = False
        batch: list[EngineCoreOutput] = []
        for kind, payload in messages:
            if kind == "outputs":
                outputs, stats = payload
                self._record_stats(stats)
                batch.extend(outputs)
                continue
            if batch:
                self._on_outputs(batch)
                batch = []
            self._on_message(kind, payload)
        if batch:
            self._on_outputs(batch)

    def _on_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        """Detokenize one step's outputs and route each request's delta to its stream."""
        assert self._processor is not None
        self._generation_tokens_total += sum(len(o.new_token_ids) for o in outputs)
        results, to_abort = self._processor.process(outputs, delta=True)
        if to_abort:  # stop strings found here: the engine must stop generating for them
            self._send_abort(to_abort)
        for result in results:
            queue = self._queues.get(result.request_id)
            if queue is not None:
                queue.put_nowait(result)

    def _fail_request(self, request_id: str, error: BaseException) -> None:
        """End one open stream with `error` (e.g. the engine rejected it after admission)."""
        self._abort_now(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(error)

    def _mark_dead(self, reason: str, expected: bool = False) -> None:
        """The engine stopped: every open stream ends with EngineDeadError, and so does every new request."""
        if self._dead_reason is None:
            if expected:
                logger.info("engine stopped")
            else:
                logger.error("engine stopped: %s", reason)
            self._dead_reason = reason
        for queue in self._queues.values():
            queue.put_nowait(EngineDeadError(f"the engine stopped: {reason}"))
        self._queues.clear()


def _coalesce_waiting(
    output: RequestOutput, queue: asyncio.Queue[Any]
) -> tuple[RequestOutput, BaseException | None]:
    """Fold the deltas already queued behind `output` into it. A consumer slower than the engine
    (hundreds of streams on one event loop) then sends one larger delta instead of one per engine
    step, so its per-delta cost (SSE framing, JSON, socket writes) stops growing with the backlog.
    Returns the merged output and an error queued after it (raised once the output is delivered)."""
    while not output.finished and not queue.empty():
        following = queue.get_nowait()
        if isinstance(following, BaseException):
            return output, following
        output = merge_deltas(output, following)
    return output, None


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
