"""The MLX generation thread: loads the model, then steps the GenerationLoop while there is work and
posts every step's outputs through a callback (mlx-lm's BatchGenerator is synchronous). It takes the
engine core's commands (AddRequests, AbortRequests, Shutdown) and reports as the core does: WorkerInfo
once loaded, a StepResult per step, CoreFailed."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, assert_never

from batchlm.config import EngineConfig
from batchlm.engine.front_end import StepResult
from batchlm.executor.core_messages import AbortRequests, AddRequests, CoreFailed, Shutdown, ToCore
from batchlm.outputs import EngineCoreOutput, FinishReason
from batchlm.request import EngineCoreRequest

if TYPE_CHECKING:  # the loop imports mlx, which loads only on the generation thread
    from batchlm.backends.mlx.loop import GenerationLoop

logger = logging.getLogger(__name__)

# Prompt tokens per prefill chunk when EngineConfig.max_num_batched_tokens is not set (mlx-lm's default).
DEFAULT_PREFILL_STEP = 2048
# Prompts prefilled side by side (mlx_lm.server's default prompt concurrency).
PREFILL_BATCH_SIZE = 8
# The prompt cache's budget when --cpu-kv-cache-gib is not given.
MLX_KV_CACHE_GIB = 2.0


@dataclass(frozen=True)
class WorkerInfo:
    """What the front end learns once the model is loaded (the thread's "ready" message)."""

    max_model_len: int
    vocab_size: int
    model_dir: Path
    quantized: bool


# What the thread posts besides step results.
WorkerEvent = WorkerInfo | CoreFailed
Post = Callable[[StepResult | WorkerEvent], object]  # its return value (delivered or not) is ignored here


class GenerationWorker:
    """Owns the model and the loop on one thread; add/abort/stop are thread-safe."""

    def __init__(self, config: EngineConfig, model_dir: Path, post: Post) -> None:
        self.config = config
        self.model_dir = model_dir
        self._post = post
        self._inbox: queue.SimpleQueue[ToCore] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="batchlm-mlx-generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, requests: list[EngineCoreRequest]) -> None:
        self._inbox.put(AddRequests(tuple(requests)))

    def abort(self, request_ids: Iterable[str]) -> None:
        self._inbox.put(AbortRequests(tuple(request_ids)))

    def stop(self, timeout: float) -> None:
        """Ask the thread to finish and wait for it (blocking: call from an executor)."""
        self._inbox.put(Shutdown())
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _wake(self) -> None:
        """A grammar compiled ahead is ready: an empty command wakes the thread to take it."""
        self._inbox.put(AddRequests(()))

    # -- the thread --------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            loop = self._build_loop()
        except Exception as exc:
            logger.exception("the mlx backend failed to load %s", self.model_dir)
            self._post(CoreFailed(f"{type(exc).__name__}: {exc}"))
            return
        try:
            self._serve(loop)
        except Exception as exc:  # a bug outside a model step: nothing can be trusted any more
            logger.exception("the mlx generation thread failed")
            self._post(CoreFailed.after(exc))
        finally:
            loop.close()

    def _build_loop(self) -> GenerationLoop:
        import mlx.core as mx

        from batchlm.backends.mlx.loader import load_model
        from batchlm.backends.mlx.loop import GenerationLoop, LoopSettings

        loaded = load_model(self.config, self.model_dir)
        settings = LoopSettings(
            max_num_seqs=self.config.max_num_seqs,
            prefill_step_size=self.config.max_num_batched_tokens or DEFAULT_PREFILL_STEP,
            prefill_batch_size=PREFILL_BATCH_SIZE,
            kv_budget_bytes=int(_cache_gib(self.config) * (1 << 30)),
            enable_prefix_caching=self.config.enable_prefix_caching,
        )
        # The generator's stream must belong to this thread (as mlx_lm.server does it).
        stream = mx.default_stream(mx.default_device())
        model_key = (str(self.model_dir), self.config.adapter_path, self.config.dtype)
        from batchlm.structured.factory import backend_factory

        grammars = backend_factory(self.config, self.model_dir, loaded.vocab_size)
        loop = GenerationLoop(
            loaded.model, loaded.vocab_size, settings, model_key, stream, grammars, wake=self._wake
        )
        self._post(WorkerInfo(loaded.max_model_len, loaded.vocab_size, self.model_dir, loaded.quantized))
        return loop

    def _serve(self, loop: GenerationLoop) -> None:
        # While requests only wait for their grammar, the thread waits for commands; the compile's end
        # wakes it (the loop's `wake`). Stand-in loops without grammars step whenever they have work.
        can_step: Callable[[], bool] = getattr(loop, "can_step", loop.has_work)
        while True:
            commands = self._drain(block=not can_step())
            outputs: list[EngineCoreOutput] = []
            for command in commands:
                if isinstance(command, Shutdown):
                    return
                outputs += _apply(loop, command)
            try:
                if can_step():
                    outputs += loop.step()
            except Exception as exc:
                logger.exception("an mlx generation step failed; failing the running requests")
                outputs += loop.fail_running(f"the generation step failed: {type(exc).__name__}: {exc}")
            if outputs or commands:
                self._post(StepResult(outputs, loop.stats()))

    def _drain(self, block: bool) -> list[ToCore]:
        commands = [self._inbox.get()] if block else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands


def _apply(loop: GenerationLoop, command: AddRequests | AbortRequests) -> list[EngineCoreOutput]:
    """Carry out one command; the outputs it makes at once (aborted requests, refused ones)."""
    match command:
        case AbortRequests(request_ids):
            return loop.abort_requests(request_ids)
        case AddRequests(requests):
            return _add_each(loop, requests)
        case _:
            assert_never(command)


def _add_each(loop: GenerationLoop, requests: tuple[EngineCoreRequest, ...]) -> list[EngineCoreOutput]:
    """Add the requests one by one; each the loop refuses finishes at once with its error."""
    failed = []
    for request in requests:
        try:
            loop.add_request(request)
        except ValueError as exc:
            failed.append(
                EngineCoreOutput(request.request_id, (), finish_reason=FinishReason.ERROR, error=str(exc))
            )
    return failed


def _cache_gib(config: EngineConfig) -> float:
    return MLX_KV_CACHE_GIB if config.cpu_kv_cache_gib is None else config.cpu_kv_cache_gib
