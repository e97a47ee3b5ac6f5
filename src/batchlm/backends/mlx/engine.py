"""MLXEngine: the EngineClient the server uses on Apple Silicon, generating through mlx-lm on a thread
and sharing the PyTorch engine's front end (request validation, detokenizer, stop strings, n > 1)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from batchlm.backends import MLX_INSTALL_HINT, mlx_available
from batchlm.backends.mlx.loader import check_config, resolve_model_dir
from batchlm.backends.mlx.worker import GenerationWorker, WorkerInfo
from batchlm.config import EngineConfig
from batchlm.engine.client import (
    EngineClient,
    EngineDeadError,
    EngineStats,
    ModelInfo,
    QueueFullError,
    RequestRejectedError,
)
from batchlm.engine.core_builder import served_model_name
from batchlm.engine.output_processor import OutputProcessor
from batchlm.engine.requests import make_core_requests, validate_request
from batchlm.outputs import EngineCoreOutput, RequestOutput
from batchlm.sampling_params import SamplingParams
from batchlm.tokenizer.tokenizer import Tokenizer

if TYPE_CHECKING:
    from batchlm.backends.mlx.loop import LoopStats

logger = logging.getLogger(__name__)

# Seconds shutdown() waits for the generation thread to finish its step.
SHUTDOWN_TIMEOUT_S = 10.0


class MLXEngine(EngineClient):
    """Front end of the MLX backend. Its state is touched only on the event loop's thread; the
    generation thread posts outputs to it with call_soon_threadsafe."""

    def __init__(self, config: EngineConfig, *, max_queue: int | None = None) -> None:
        """Cheap: checks the config and that mlx is installed; start() loads. Raises ValueError."""
        if not mlx_available():
            raise ValueError(f"the mlx backend needs the mlx and mlx-lm packages: {MLX_INSTALL_HINT}")
        check_config(config)
        self.config = config
        self.max_queue = max_queue
        self.info: WorkerInfo | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: GenerationWorker | None = None
        self._processor: OutputProcessor | None = None
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._started: asyncio.Future[WorkerInfo] | None = None
        self._loop_stats: LoopStats | None = None
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._ready = False
        self._dead_reason: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Find the model, load the tokenizer here and the model on the generation thread; returns once
        both are ready (raises EngineDeadError naming the cause otherwise)."""
        self._loop = asyncio.get_running_loop()
        try:
            model_dir = await self._loop.run_in_executor(None, resolve_model_dir, self.config)
            self.tokenizer = await self._loop.run_in_executor(None, self._load_tokenizer, model_dir)
        except (OSError, ValueError) as exc:
            self._dead_reason = str(exc)
            raise EngineDeadError(f"the mlx engine failed to start: {exc}") from exc
        self._processor = OutputProcessor(self.tokenizer)
        self._started = self._loop.create_future()
        self._worker = GenerationWorker(self.config, model_dir, self._post_threadsafe)
        self._worker.start()
        try:
            info = await self._started
        except EngineDeadError:
            await self._loop.run_in_executor(None, self._worker.stop, SHUTDOWN_TIMEOUT_S)
            raise
        self.info = info
        name = served_model_name(self.config)
        self.model_info = ModelInfo(
            served_model_name=name,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            aliases=tuple(sorted({self.config.model, str(model_dir)} - {name})),
        )
        self._ready = True
        logger.info("mlx engine ready: %s (max_model_len %d)", name, info.max_model_len)

    def _load_tokenizer(self, model_dir: Any) -> Tokenizer:
        return Tokenizer.from_pretrained(
            self.config.tokenizer or model_dir,
            chat_template=self.config.chat_template,
            trust_remote_code=self.config.trust_remote_code,
        )

    async def shutdown(self) -> None:
        """Stop the generation thread (after its current step) and end every open stream."""
        self._ready = False
        if self._worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._worker.stop, SHUTDOWN_TIMEOUT_S)
        self._mark_dead("the engine was shut down", expected=True)

    # -- EngineClient ----------------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._ready and self._dead_reason is None

    @property
    def is_dead(self) -> bool:
        return self._dead_reason is not None

    def stats(self) -> EngineStats:
        totals = {
            "prompt_tokens_total": self._prompt_tokens_total,
            "generation_tokens_total": self._generation_tokens_total,
        }
        loop = self._loop_stats
        if loop is None:
            return EngineStats(**totals)
        return EngineStats(
            num_running=loop.num_running,
            num_waiting=loop.num_waiting,
            kv_cache_usage=loop.kv_cache_usage,
            prefix_cache_queries=loop.prefix_cache_queries,
            prefix_cache_hits=loop.prefix_cache_hits,
            **totals,
        )

    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        queue = self._submit(prompt_token_ids, sampling_params, request_id, prompt)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
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

    # -- internals ---------------------------------------------------------------------------------------

    def _submit(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, prompt: str | None
    ) -> asyncio.Queue[Any]:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        if not self._ready or self.info is None or self._processor is None or self._worker is None:
            raise EngineDeadError("the engine is still loading")
        params = validate_request(prompt_token_ids, params, self.info.max_model_len, self.info.vocab_size)
        if request_id in self._queues or self._processor.has_request(request_id):
            raise RequestRejectedError(f"request id {request_id!r} is already in use", "request_id")
        if self.max_queue is not None:
            waiting = len(self._queues) - self.config.max_num_seqs
            if waiting >= self.max_queue:
                raise QueueFullError(
                    f"the server is overloaded: {waiting} requests are already waiting (--max-queue "
                    f"{self.max_queue}); retry later"
                )
        now = time.time()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[request_id] = queue
        self._processor.add_request(request_id, prompt, prompt_token_ids, params, now)
        core_requests = make_core_requests(
            request_id, prompt_token_ids, params, self.tokenizer.eos_token_ids, now
        )
        self._prompt_tokens_total += len(prompt_token_ids)
        self._worker.add(core_requests)
        return queue

    def _abort_now(self, request_id: str) -> None:
        if self._processor is None:
            return
        core_ids = self._processor.core_ids_of(request_id)
        self._processor.abort_request(request_id)
        if core_ids and self._worker is not None and self._dead_reason is None:
            self._worker.abort(core_ids)

    def _post_threadsafe(self, kind: str, payload: Any) -> None:
        """Called on the generation thread: hand the message to the event loop."""
        assert self._loop is not None
        # A closed event loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._on_message, kind, payload)

    def _on_message(self, kind: str, payload: Any) -> None:
        if kind == "ready":
            if self._started is not None and not self._started.done():
                self._started.set_result(payload)
        elif kind == "outputs":
            outputs, self._loop_stats = payload
            self._on_outputs(outputs)
        elif kind == "failed":
            if self._started is not None and not self._started.done():
                self._started.set_exception(EngineDeadError(f"the mlx engine failed to start: {payload}"))
            self._mark_dead(str(payload))

    def _on_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        assert self._processor is not None and self._worker is not None
        self._generation_tokens_total += sum(len(o.new_token_ids) for o in outputs)
        results, to_abort = self._processor.process(outputs, delta=True)
        if to_abort:
            self._worker.abort(to_abort)
        for result in results:
            queue = self._queues.get(result.request_id)
            if queue is not None:
                queue.put_nowait(result)

    def _mark_dead(self, reason: str, expected: bool = False) -> None:
        if self._dead_reason is None:
            logger.log(logging.INFO if expected else logging.ERROR, "mlx engine stopped: %s", reason)
            self._dead_reason = reason
        for queue in self._queues.values():
            queue.put_nowait(EngineDeadError(f"the engine stopped: {reason}"))
        self._queues.clear()
