"""The request-routing half shared by every EngineClient: admission limits, an inbox for what the
engine's thread reports, one output collector per request fed by the detokenizing OutputProcessor,
aborts on disconnect, and failing open streams when the engine stops. Subclasses only say how core
requests and aborts reach their engine and what its other messages mean; requests arrive validated
(engine/input_processor.py)."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from abc import abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from batchlm.config import EngineConfig
from batchlm.core.facts import ModelFacts
from batchlm.engine.client import (
    EngineClient,
    EngineDeadError,
    EngineStats,
    QueueFullError,
    RequestRejectedError,
    ServedModel,
)
from batchlm.engine.input_processor import InputProcessor, ValidatedRequest
from batchlm.engine.output_collector import RequestOutputCollector
from batchlm.engine.output_processor import OutputProcessor
from batchlm.models.model_source import served_model_name
from batchlm.outputs import CoreOutputs, EngineCoreOutput, RequestOutput
from batchlm.request import EngineCoreRequest
from batchlm.sampling_defaults import sampling_defaults

logger = logging.getLogger(__name__)

# Step outputs are handed to the collectors at most once per this interval times the number of open
# streams (up to MAX_DRAIN_INTERVAL_S). One stream sees every step at once; hundreds of streams get a
# few steps' tokens per delta, which bounds the event loop's per-delta work (detokenizing, SSE framing,
# socket writes) and leaves it time to take in new requests.
DRAIN_INTERVAL_PER_STREAM_S = 50e-6
MAX_DRAIN_INTERVAL_S = 0.02


@dataclass(frozen=True)
class StepResult:
    """One engine step's outputs, with the engine's stats after the step: as the engine core sends
    them (columns: the output processor folds plain new tokens in without an object each), or a list.
    They are handed over: the engine's thread keeps no reference."""

    outputs: CoreOutputs | list[EngineCoreOutput]
    stats: EngineStats


# The engine's other messages: each front end names its own (a union of frozen dataclasses).
MessageT = TypeVar("MessageT")


class StreamingFrontEnd(EngineClient, Generic[MessageT]):
    """All state here is touched only on the event loop's thread; the engine's thread hands its
    messages over with _post_threadsafe and they are handled, in order, on the loop: every StepResult
    here, every other message (a MessageT) by the subclass."""

    def __init__(self, config: EngineConfig, max_queue: int | None, front_ends: int = 1) -> None:
        self.config = config
        # With several front ends on one core (`--api-servers N`), each sees only its own requests:
        # it counts its share of the batch as running and refuses past its share of the queue, so that
        # together they hold no more than the batch plus --max-queue.
        self.max_queue = None if max_queue is None else -(-max_queue // front_ends)
        self._running_share = -(-config.max_num_seqs // front_ends)
        self._front_ends = front_ends
        self._processor: OutputProcessor | None = None
        self._collectors: dict[str, RequestOutputCollector] = {}
        # The engine's stats as its last step reported them.
        self._engine_stats = EngineStats()
        self._generation_tokens_total = 0
        self._ready = False
        self._dead_reason: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Messages from the engine's thread, drained on the event loop (see _drain_inbox).
        self._inbox: collections.deque[StepResult | MessageT] = collections.deque()
        self._inbox_lock = threading.Lock()
        self._inbox_drain_pending = False
        self._last_drain = 0.0

    # -- what a subclass provides --------------------------------------------------------------------

    @abstractmethod
    def _send_requests(self, core_requests: list[EngineCoreRequest]) -> bool:
        """Hand new core requests to the engine; False when there is no engine to take them."""

    @abstractmethod
    def _send_abort(self, core_ids: list[str]) -> None:
        """Ask the engine to drop these core requests (it may already have finished them)."""

    @abstractmethod
    def _on_message(self, message: MessageT) -> None:
        """Handle an engine message other than a StepResult (on the event loop)."""

    def _open_streams(self) -> int:
        """Streams the drain interval is set for (see DRAIN_INTERVAL_PER_STREAM_S): this front end's."""
        return len(self._collectors)

    # -- EngineClient ----------------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._ready and self._dead_reason is None

    @property
    def is_dead(self) -> bool:
        return self._dead_reason is not None

    async def submit(
        self, request: ValidatedRequest, request_id: str, group_id: str = ""
    ) -> AsyncGenerator[RequestOutput, None]:
        collector = self._add(request, request_id, group_id)
        finished = False
        try:
            while not finished:
                output = await collector.get()
                finished = output.finished
                yield output
        finally:
            self._collectors.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)

    async def abort(self, request_id: str) -> None:
        self._fail_request(request_id, asyncio.CancelledError())

    # -- shared internals ------------------------------------------------------------------------------

    def _serve(self, facts: ModelFacts, model_dir: Path) -> None:
        """Ready to take requests for the loaded model, named as the config and its directory say."""
        self._processor = OutputProcessor(self.tokenizer)
        defaults = sampling_defaults(self.config.generation_config, model_dir)
        self.input_processor = InputProcessor.for_model(facts, self.tokenizer, defaults.max_new_tokens)
        name = served_model_name(self.config, model_dir)
        aliases = tuple(sorted({self.config.model, str(model_dir)} - {name}))
        self.model_info = ServedModel(name, facts, aliases, defaults, repr(self.config))
        self._ready = True

    def _add(self, request: ValidatedRequest, request_id: str, group_id: str) -> RequestOutputCollector:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        if not self._ready or self._processor is None:
            raise EngineDeadError("the engine is still loading")
        if request_id in self._collectors or self._processor.has_request(request_id):
            raise RequestRejectedError(f"request id {request_id!r} is already in use", "request_id")
        self._check_queue_room()
        eos_ids = self.tokenizer.eos_token_ids
        core_requests = self._processor.add_validated(request_id, request, eos_ids, group_id)
        collector = self._collectors[request_id] = RequestOutputCollector()
        if not self._send_requests(core_requests):
            self._collectors.pop(request_id, None)
            self._processor.abort_request(request_id)
            raise EngineDeadError("the engine is not running")
        return collector

    def most_requests_at_once(self) -> int | None:
        if self.max_queue is None:
            return None
        return self._running_share + self.max_queue

    def _check_queue_room(self) -> None:
        if self.max_queue is None:
            return
        waiting = len(self._collectors) - self._running_share
        if waiting >= self.max_queue:
            limit = f"--max-queue {self.max_queue}"
            if self._front_ends > 1:
                limit = f"this API server's share of --max-queue: {self.max_queue}"
            raise QueueFullError(
                f"the server is overloaded: {waiting} requests are already waiting ({limit}); retry later"
            )

    def _abort_now(self, request_id: str) -> None:
        if self._processor is None:
            return
        core_ids = self._processor.core_ids_of(request_id)
        self._processor.abort_request(request_id)
        if core_ids and self._dead_reason is None:
            self._send_abort(core_ids)

    def _post_threadsafe(self, message: StepResult | MessageT) -> bool:
        """Called on the engine's thread: queue a message for the event loop. False when the loop is
        closed (nobody is listening any more)."""
        assert self._loop is not None
        with self._inbox_lock:
            self._inbox.append(message)
            wake = not self._inbox_drain_pending
            self._inbox_drain_pending = True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._drain_inbox)
            except RuntimeError:
                return False
        return True

    def _drain_inbox(self) -> None:
        """Handle, in order, every message that arrived since the last drain, at the paced interval;
        consecutive step outputs go to the output processor as one batch."""
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
        batch = CoreOutputs()
        for message in messages:
            if isinstance(message, StepResult):
                self._engine_stats = message.stats
                outputs = message.outputs
                if isinstance(outputs, CoreOutputs):
                    batch.extend(outputs)
                else:
                    for output in outputs:
                        batch.append(output)
                continue
            if batch:
                self._on_outputs(batch)
                batch = CoreOutputs()
            self._on_message(message)
        if batch:
            self._on_outputs(batch)

    def _on_outputs(self, outputs: CoreOutputs) -> None:
        """Detokenize one step's outputs and put each request's delta into its collector."""
        assert self._processor is not None
        self._generation_tokens_total += outputs.num_tokens()
        results, to_abort = self._processor.process(outputs, delta=True)
        if to_abort:  # stop strings found here: the engine must stop generating for them
            self._send_abort(to_abort)
        for result in results:
            collector = self._collectors.get(result.request_id)
            if collector is not None:
                collector.put(result)

    def _fail_request(self, request_id: str, error: BaseException) -> None:
        """End one open stream with `error` (an abort, or the engine rejected it after admission)."""
        self._abort_now(request_id)
        collector = self._collectors.pop(request_id, None)
        if collector is not None:
            collector.fail(error)

    def _mark_dead(self, reason: str, expected: bool = False) -> None:
        """The engine stopped: every open stream ends with EngineDeadError, and so does every new request."""
        if self._dead_reason is None:
            if expected:
                logger.info("engine stopped")
            else:
                logger.error("engine stopped: %s", reason)
            self._dead_reason = reason
        for collector in self._collectors.values():
            collector.fail(EngineDeadError(f"the engine stopped: {reason}"))
        self._collectors.clear()
