"""The request-routing half shared by every EngineClient: admission limits, one output collector per
request fed by the detokenizing OutputProcessor, aborts on disconnect, and failing open streams when the
engine stops. Subclasses only say how core requests and aborts reach their engine and what its other
messages mean; requests arrive validated (engine/input_processor.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from abc import abstractmethod
from collections.abc import AsyncGenerator
from typing import Any

from batchlm.config import EngineConfig
from batchlm.engine.client import EngineClient, EngineDeadError, QueueFullError, RequestRejectedError
from batchlm.engine.input_processor import ValidatedRequest
from batchlm.engine.output_collector import RequestOutputCollector
from batchlm.engine.output_processor import OutputProcessor
from batchlm.engine.requests import make_core_requests
from batchlm.outputs import EngineCoreOutput, RequestOutput
from batchlm.request import EngineCoreRequest

logger = logging.getLogger(__name__)


class StreamingFrontEnd(EngineClient):
    """All state here is touched only on the event loop's thread; the engine's thread hands its
    messages over with _post_threadsafe and they are handled, in order, on the loop."""

    def __init__(self, config: EngineConfig, max_queue: int | None) -> None:
        self.config = config
        self.max_queue = max_queue
        self._processor: OutputProcessor | None = None
        self._collectors: dict[str, RequestOutputCollector] = {}
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._ready = False
        self._dead_reason: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- what a subclass provides --------------------------------------------------------------------

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
        self._abort_now(request_id)
        collector = self._collectors.pop(request_id, None)
        if collector is not None:
            collector.fail(asyncio.CancelledError())

    # -- shared internals ------------------------------------------------------------------------------

    def _add(self, request: ValidatedRequest, request_id: str, group_id: str) -> RequestOutputCollector:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        if not self._ready or self._processor is None:
            raise EngineDeadError("the engine is still loading")
        if request_id in self._collectors or self._processor.has_request(request_id):
            raise RequestRejectedError(f"request id {request_id!r} is already in use", "request_id")
        self._check_queue_room()
        now = time.time()
        prompt_ids, params = request.prompt_token_ids, request.params
        core_requests = make_core_requests(
            request_id, prompt_ids, params, self.tokenizer.eos_token_ids, now, group_id
        )
        collector = self._collectors[request_id] = RequestOutputCollector()
        self._processor.add_request(request_id, request.prompt, prompt_ids, params, now)
        self._prompt_tokens_total += len(prompt_ids)
        if not self._send_requests(core_requests):
            self._collectors.pop(request_id, None)
            self._processor.abort_request(request_id)
            raise EngineDeadError("the engine is not running")
        return collector

    def _check_queue_room(self) -> None:
        if self.max_queue is None:
            return
        waiting = len(self._collectors) - self.config.max_num_seqs
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
        """Called on the engine's thread: hand a message to the event loop. An "outputs" payload is
        (EngineCoreOutputs, stats). False when the loop is closed (nobody is listening any more)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._handle, kind, payload)
        except RuntimeError:
            return False
        return True

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "outputs":
            outputs, stats = payload
            self._record_stats(stats)
            self._on_outputs(outputs)
        else:
            self._on_message(kind, payload)

    def _on_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        """Detokenize one step's outputs and put each request's delta into its collector."""
        assert self._processor is not None
        self._generation_tokens_total += sum(len(o.new_token_ids) for o in outputs)
        results, to_abort = self._processor.process(outputs, delta=True)
        if to_abort:  # stop strings found here: the engine must stop generating for them
            self._send_abort(to_abort)
        for result in results:
            collector = self._collectors.get(result.request_id)
            if collector is not None:
                collector.put(result)

    def _fail_request(self, request_id: str, error: BaseException) -> None:
        """End one open stream with `error` (e.g. the engine rejected it after admission)."""
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
