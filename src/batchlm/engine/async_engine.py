"""The async engine the server uses: the engine core runs in its own process; outputs stream back
over a pipe, are detokenized here, and are routed to each request's async iterator."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import queue
import threading
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import assert_never

from batchlm.config import EngineConfig
from batchlm.core.facts import ModelFacts
from batchlm.engine.client import EngineDeadError, EngineStats, RequestRejectedError
from batchlm.engine.front_end import StepResult, StreamingFrontEnd
from batchlm.executor.core_messages import (
    AbortRequests,
    AddRequests,
    CoreFailed,
    CoreReady,
    FromCore,
    RequestRejected,
    Shutdown,
    StepOutputs,
    ToCore,
)
from batchlm.executor.core_process import engine_core_main
from batchlm.models.model_source import load_tokenizer, prepare_model_dir
from batchlm.request import EngineCoreRequest
from batchlm.startup_log import log_uptime, timed_phase
from batchlm.stop_signals import start_resource_tracker_past_hangup
from batchlm.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


# Called with the model directory and the pipes of the extra front ends once the core process starts.
CoreSharing = Callable[[Path, list[Connection]], None]

# The core's messages the inbox carries besides step results (StepOutputs arrive as StepResults).
CoreEvent = RequestRejected | CoreFailed

# How long a core process told to shut down may take to exit before it is killed (a loaded 2-core
# machine took 4 s of it for the tiny test model).
CORE_EXIT_GRACE_S = 10.0
# A killed core goes as soon as the system runs it again, which on a loaded machine may take longer
# than a short grace period: waited for on its own bound, which only a process stuck in the kernel
# reaches.
KILLED_CORE_EXIT_S = 30.0


class AsyncLLMEngine(StreamingFrontEnd[CoreEvent]):
    """Front end of the engine. All state here is touched only on the event loop's thread; a reader
    thread blocks on the pipe and hands each message to the loop, and a writer thread sends the
    loop's messages to the core (see _write_loop).

    Several front ends (API-server processes) can share one core: the one that starts the core
    (share_core) hands the other pipes out; the others are built with attached() and only detach from
    the core when they shut down."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        multiprocess: bool = True,
        max_queue: int | None = None,
        front_ends: int = 1,
    ) -> None:
        super().__init__(config, max_queue, front_ends)
        self.multiprocess = multiprocess
        self._conn: Connection | None = None
        self._worker: multiprocessing.process.BaseProcess | threading.Thread | None = None
        self._shutting_down = False
        self.info: ModelFacts | None = None
        # The model directory once the core runs before start(): begin_loading() started it, or
        # (attached()) another front end did.
        self._model_dir: Path | None = None
        # Messages for the core, in order; the writer thread stops after sending Shutdown.
        self._outbox: queue.SimpleQueue[ToCore] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._extra_front_ends = 0
        self._on_core_started: CoreSharing | None = None
        self._tokenizer_loading: concurrent.futures.Future[Tokenizer] | None = None

    @classmethod
    def attached(
        cls,
        config: EngineConfig,
        conn: Connection,
        model_dir: Path,
        *,
        max_queue: int | None = None,
        front_ends: int = 1,
        tokenizer: concurrent.futures.Future[Tokenizer] | None = None,
    ) -> AsyncLLMEngine:
        """A front end on a core that another front end started (`conn` is this one's pipe to it;
        `front_ends` of them share the core). `tokenizer`: its load, already under way (start() waits
        for it instead of loading one)."""
        engine = cls(config, max_queue=max_queue, front_ends=front_ends)
        engine._conn = conn
        engine._model_dir = model_dir
        engine._tokenizer_loading = tokenizer
        return engine

    def share_core(self, extra_front_ends: int, on_core_started: CoreSharing) -> None:
        """Start the core with pipes for `extra_front_ends` more front ends, and hand them (with the
        model directory) to `on_core_started` as soon as the core process starts. Call before
        begin_loading()/start()."""
        if not self.multiprocess:
            raise ValueError("sharing the engine core needs the core in its own process")
        if self._conn is not None:
            raise RuntimeError("share_core() must come before the engine core starts")
        self._extra_front_ends = extra_front_ends
        self._on_core_started = on_core_started

    # -- lifecycle -------------------------------------------------------------------------------

    def begin_loading(self) -> None:
        """Start the engine core process now, when the model is a local directory (no download to
        wait for; a download happens in start(), with the server up and /health saying so): the
        core's start-up (torch import, model, compiles, CUDA graphs) is the long pole of
        time-to-ready, and this overlaps the server's imports and set-up with it."""
        if (
            not self.multiprocess
            or self._conn is not None
            or not Path(self.config.model).expanduser().is_dir()
        ):
            return
        self._model_dir = prepare_model_dir(self.config)
        self._conn = self._spawn_core(self._model_dir)
        log_uptime(logger, "front end: engine core started (before the server's set-up)")

    async def start(self) -> None:
        """Load the tokenizer here and the model in the engine core; returns once both are ready."""
        self._loop = asyncio.get_running_loop()
        model_dir = self._model_dir
        if model_dir is None:
            model_dir = await self._prepare_model_dir()
            # The core starts first (torch import, model, CUDA graphs): the tokenizer loads meanwhile.
            self._conn = self._spawn_core(model_dir)
        try:
            with timed_phase(logger, "tokenizer load (front end, beside the engine core)"):
                if self._tokenizer_loading is not None:
                    self.tokenizer = await asyncio.wrap_future(self._tokenizer_loading)
                else:
                    self.tokenizer = await self._loop.run_in_executor(
                        None, load_tokenizer, self.config, model_dir
                    )
            # Cancelled here (Ctrl-C while the model loads), the core is stopped now: it reads no
            # message until it is ready, so shutdown() would wait out its grace period for it.
            first = await self._loop.run_in_executor(None, self._recv_or_eof)
        except BaseException:
            self._stop_core_now()
            raise
        if not isinstance(first, CoreReady):
            reason = first.reason if isinstance(first, CoreFailed) else f"unexpected {type(first).__name__}"
            self._dead_reason = reason
            raise EngineDeadError(f"the engine failed to start: {reason}")
        self.info = first.facts
        threading.Thread(target=self._read_loop, name="batchlm-engine-reader", daemon=True).start()
        self._writer = threading.Thread(target=self._write_loop, name="batchlm-engine-writer", daemon=True)
        self._writer.start()
        self._serve(first.facts, model_dir)

    async def _prepare_model_dir(self) -> Path:
        """prepare_model_dir on a worker thread (it may download). A stop while it runs tells it to
        give up: the interpreter waits for that thread at exit, so a download left running would
        keep a stopped server alive until the download ended."""
        assert self._loop is not None
        cancel = threading.Event()
        try:
            return await self._loop.run_in_executor(None, prepare_model_dir, self.config, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def _spawn_core(self, model_dir: Path) -> Connection:
        log_level = logging.getLogger("batchlm").getEffectiveLevel()
        if self.multiprocess:
            context = multiprocessing.get_context("spawn")
            start_resource_tracker_past_hangup()  # before the first child process starts it
            pipes = [context.Pipe() for _ in range(1 + self._extra_front_ends)]
            process = context.Process(
                target=engine_core_main,
                args=(self.config, model_dir, [core_end for _, core_end in pipes], log_level),
                name="batchlm-engine-core",
                daemon=True,
            )
            process.start()
            for _, core_end in pipes:
                core_end.close()
            self._worker = process
            if self._on_core_started is not None:
                self._on_core_started(model_dir, [front_end for front_end, _ in pipes[1:]])
            return pipes[0][0]
        parent, child = multiprocessing.Pipe()
        thread = threading.Thread(
            target=engine_core_main,
            args=(self.config, model_dir, child),
            name="batchlm-engine-core",
            daemon=True,
        )
        thread.start()
        self._worker = thread
        return parent

    def stop_now(self) -> None:
        """Stop the engine core at once, from outside an event loop (a start cut short before the
        server's loop runs): a core process is killed, loading or not."""
        self._stop_core_now()
        if isinstance(self._worker, multiprocessing.process.BaseProcess):
            self._worker.join(KILLED_CORE_EXIT_S)

    def _stop_core_now(self) -> None:
        """Start failed on this side: a core process still loading the model is killed (it ignores
        SIGTERM by design); a core thread cannot be, and stops at its first look at the pipe."""
        if isinstance(self._worker, multiprocessing.process.BaseProcess):
            self._worker.kill()
        elif self._conn is not None:
            with contextlib.suppress(OSError, BrokenPipeError):
                self._conn.send(Shutdown())

    def _recv_or_eof(self) -> FromCore:
        assert self._conn is not None
        try:
            message: FromCore = self._conn.recv()
            return message
        except (EOFError, OSError):
            return CoreFailed("the engine core process exited")

    async def shutdown(self) -> None:
        """Stop the core (or, attached, detach from it: the core aborts this front end's requests)."""
        self._ready = False
        self._shutting_down = True
        with contextlib.suppress(OSError, BrokenPipeError):
            self._to_core(Shutdown())
        worker = self._worker
        loop = asyncio.get_running_loop()
        if worker is not None:
            await loop.run_in_executor(None, worker.join, CORE_EXIT_GRACE_S)
        if isinstance(worker, multiprocessing.process.BaseProcess) and worker.is_alive():
            # Killed: the core ignores SIGTERM by design (engine_core_main), so terminate() would leave
            # it running past this call, and this process's exit would wait for it (multiprocessing
            # joins its children at exit).
            logger.warning("the engine core did not exit within %.0f s; killing it", CORE_EXIT_GRACE_S)
            worker.kill()
            await loop.run_in_executor(None, worker.join, KILLED_CORE_EXIT_S)
        self._mark_dead("the engine was shut down", expected=True)

    # -- EngineClient ------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        # The core's counts: they include what other front ends sharing the core sent.
        if self.info is None:
            return self._engine_stats
        return replace(
            self._engine_stats, kv_cache_blocks=self.info.num_blocks, kv_cache_bits=self.info.kv_cache_bits
        )

    # -- StreamingFrontEnd transport ---------------------------------------------------------------

    def _send_requests(self, core_requests: list[EngineCoreRequest]) -> bool:
        return self._to_core(AddRequests(tuple(core_requests)))

    def _send_abort(self, core_ids: list[str]) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._to_core(AbortRequests(tuple(core_ids)))

    def _to_core(self, message: ToCore) -> bool:
        """Queue a message for the writer thread (or, before it runs, send it now); False without a core."""
        if self._conn is None:
            return False
        if self._writer is None:
            self._conn.send(message)
        else:
            self._outbox.put(message)
        return True

    # -- internals -----------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        """Reader thread: queue every message for the event loop until the pipe closes."""
        while True:
            message = self._recv_or_eof()
            if not self._post_threadsafe(_for_front_end(message)) or isinstance(message, CoreFailed):
                return

    def _write_loop(self) -> None:
        """Writer thread: send queued messages in order, consecutive request batches as one message.

        A send blocks while the pipe's buffer is full, and the core empties it only between steps. A
        burst of long prompts overfills it: sent from the event loop, it stalled the loop (every
        stream, every arrival). Here only this thread waits. After a failed send the core is gone: the reader thread sees the pipe close and fails
        the requests in flight."""
        assert self._conn is not None
        while True:
            message = self._outbox.get()
            pending = [message]
            with contextlib.suppress(queue.Empty):
                while True:
                    pending.append(self._outbox.get_nowait())
            for message in _merge_adds(pending):
                try:
                    self._conn.send(message)
                except (OSError, BrokenPipeError):
                    return
                if isinstance(message, Shutdown):
                    return

    def _open_streams(self) -> int:
        """Every stream of the engine, whichever front end serves it: with several API servers the
        deltas keep the interval one front end would give, so a client reading hundreds of streams is
        not sent several times as many events."""
        return max(len(self._collectors), self._engine_stats.num_running)

    def _on_message(self, message: CoreEvent) -> None:
        match message:
            case RequestRejected(core_id, reason):
                self._on_rejected(core_id, reason)
            case CoreFailed(reason):
                self._mark_dead(reason, expected=self._shutting_down)
            case _:
                assert_never(message)

    def _on_rejected(self, core_id: str, message: str) -> None:
        for request_id in list(self._collectors):
            if core_id in (self._processor.core_ids_of(request_id) if self._processor else []):
                self._fail_request(request_id, RequestRejectedError(message))


def _merge_adds(messages: list[ToCore]) -> list[ToCore]:
    """The same messages in the same order, with each run of consecutive AddRequests as one."""
    merged: list[ToCore] = []
    for message in messages:
        previous = merged[-1] if merged else None
        if isinstance(previous, AddRequests) and isinstance(message, AddRequests):
            merged[-1] = AddRequests(previous.requests + message.requests)
        else:
            merged.append(message)
    return merged


def _for_front_end(message: FromCore) -> StepResult | CoreEvent:
    """A core message as the front end's inbox takes it."""
    match message:
        case StepOutputs():
            return StepResult(message.outputs, message.stats)
        case RequestRejected() | CoreFailed():
            return message
        case CoreReady():
            return CoreFailed("the engine core reported ready twice")
        case _:
            assert_never(message)
