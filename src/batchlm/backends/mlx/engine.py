"""MLXEngine: the EngineClient the server uses on Apple Silicon, generating through mlx-lm on a thread
and sharing the PyTorch engine's front end (request validation, detokenizer, stop strings, n > 1)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import assert_never

from batchlm.backends.availability import MLX_INSTALL_HINT, mlx_available
from batchlm.backends.mlx.loader import check_config, resolve_model_dir, warn_ignored_settings
from batchlm.backends.mlx.worker import GenerationWorker, WorkerEvent, WorkerInfo
from batchlm.config import EngineConfig
from batchlm.core.facts import ModelFacts
from batchlm.engine.client import EngineDeadError, EngineStats
from batchlm.engine.front_end import StreamingFrontEnd
from batchlm.executor.core_messages import CoreFailed
from batchlm.models.model_source import eos_config_files
from batchlm.request import EngineCoreRequest
from batchlm.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Seconds shutdown() waits for the generation thread to finish its step.
SHUTDOWN_TIMEOUT_S = 10.0


class MLXEngine(StreamingFrontEnd[WorkerEvent]):
    """Front end of the MLX backend. Its state is touched only on the event loop's thread; the
    generation thread posts outputs to it with call_soon_threadsafe."""

    def __init__(self, config: EngineConfig, *, max_queue: int | None = None) -> None:
        """Cheap: checks the config and that mlx is installed; start() loads. Raises ValueError."""
        if not mlx_available():
            raise ValueError(f"the mlx backend needs the mlx and mlx-lm packages: {MLX_INSTALL_HINT}")
        check_config(config)
        warn_ignored_settings(config)
        super().__init__(config, max_queue)
        self.info: WorkerInfo | None = None
        self._worker: GenerationWorker | None = None
        self._started: asyncio.Future[WorkerInfo] | None = None

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
        self._started = self._loop.create_future()
        self._worker = GenerationWorker(self.config, model_dir, self._post_threadsafe)
        self._worker.start()
        try:
            info = await self._started
        except EngineDeadError:
            await self._loop.run_in_executor(None, self._worker.stop, SHUTDOWN_TIMEOUT_S)
            raise
        self.info = info
        self._serve(ModelFacts(info.max_model_len, info.vocab_size, computes_prompt_logprobs=True), model_dir)
        logger.info(
            "mlx engine ready: %s (max_model_len %d)", self.model_info.served_model_name, info.max_model_len
        )

    def _load_tokenizer(self, model_dir: Path) -> Tokenizer:
        return Tokenizer.from_pretrained(
            self.config.tokenizer or model_dir,
            chat_template=self.config.chat_template,
            trust_remote_code=self.config.trust_remote_code,
            eos_files=eos_config_files(self.config, model_dir),
        )

    async def shutdown(self) -> None:
        """Stop the generation thread (after its current step) and end every open stream."""
        self._ready = False
        if self._worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._worker.stop, SHUTDOWN_TIMEOUT_S)
        self._mark_dead("the engine was shut down", expected=True)

    # -- EngineClient ----------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        # The loop counts the prompt tokens it admits; the generated ones are counted here.
        return dataclasses.replace(self._engine_stats, generation_tokens_total=self._generation_tokens_total)

    # -- StreamingFrontEnd transport -------------------------------------------------------------------

    def _send_requests(self, core_requests: list[EngineCoreRequest]) -> bool:
        if self._worker is None:
            return False
        self._worker.add(core_requests)
        return True

    def _send_abort(self, core_ids: list[str]) -> None:
        if self._worker is not None:
            self._worker.abort(core_ids)

    # -- internals ---------------------------------------------------------------------------------------

    def _on_message(self, message: WorkerEvent) -> None:
        match message:
            case WorkerInfo():
                if self._started is not None and not self._started.done():
                    self._started.set_result(message)
            case CoreFailed(reason):
                if self._started is not None and not self._started.done():
                    self._started.set_exception(EngineDeadError(f"the mlx engine failed to start: {reason}"))
                self._mark_dead(reason)
            case _:
                assert_never(message)
