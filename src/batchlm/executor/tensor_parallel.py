"""The tensor-parallel executor: one spawned worker per rank, each step broadcast to all of them.

The scheduler runs once, in the engine core; every step's SchedulerOutput is encoded once (compactly,
see wire.py) and written to each worker's pipe. All ranks run the same step in lockstep (their collectives pair up) and sample
the same tokens; rank 0's ModelRunnerOutput is returned. A worker that fails or exits stops them all
and raises TensorParallelError, which ends the engine core with that message.

Constrained requests' grammars compile on every rank's background threads (tp_grammars.py) before the
core schedules them, so a large schema stalls no step.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch

from batchlm.config import EngineConfig
from batchlm.core.facts import ModelFacts
from batchlm.core.step_io import ModelRunnerOutput, SchedulerOutput
from batchlm.executor.messages import (
    AllocateKVCache,
    ExecuteStep,
    FromWorker,
    GrammarCall,
    GrammarNews,
    MeasureKVBlocks,
    StopWorker,
    WorkerCall,
    WorkerReply,
    WorkerResult,
)
from batchlm.executor.tp_grammars import TensorParallelGrammars
from batchlm.executor.wire import encode_step
from batchlm.executor.worker import WorkerSpec, sigterm_blocked_from_start, worker_main
from batchlm.stop_signals import start_resource_tracker_past_hangup

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds to wait for a worker whose pipe closed to finish exiting, before reporting it.
EXIT_STATUS_WAIT_S = 2.0

# Seconds a worker gets to exit after "shutdown" (then SIGTERM, then SIGKILL).
SHUTDOWN_GRACE_S = 5.0


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker failed or exited; the engine cannot go on."""


class TensorParallelRefused(TensorParallelError, ValueError):
    """A rank refused the configuration as it started: a ValueError as well, so that callers report
    it as the user's to fix (`batchlm generate` printed a traceback for --tensor-parallel-size 4 on a
    model of 9 heads)."""


def worker_devices(device: str, size: int) -> list[str]:
    """The device of each rank: the CPU for every rank, or `size` consecutive GPUs from cuda:N."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return ["cpu"] * size
    if device == "auto":
        device = "cuda"
    parsed = torch.device(device) if device.startswith("cuda") else None
    if parsed is None:
        raise ValueError(
            f"device {device!r} is not supported with tensor parallelism; use auto, cpu or cuda[:N]"
        )
    first = parsed.index or 0
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if first + size > available:
        raise ValueError(
            f"--tensor-parallel-size {size} from {device} needs GPUs cuda:{first}..cuda:{first + size - 1}, "
            f"but this machine has {available} GPU(s)"
        )
    return [f"cuda:{first + rank}" for rank in range(size)]


def build_tensor_parallel_executor(
    config: EngineConfig, model_dir: Path
) -> tuple[TensorParallelExecutor, ModelFacts]:
    """Start config.tensor_parallel_size workers and size the KV cache to the smallest rank's room."""
    executor = TensorParallelExecutor(config, Path(model_dir))
    try:
        info = executor.initialize_kv_cache()
    except BaseException:
        executor.shutdown()
        raise
    return executor, info


class TensorParallelExecutor:
    """Drives the worker processes. Implements the engine core's Executor protocol."""

    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        size = config.tensor_parallel_size
        if size < 2:
            raise ValueError(f"TensorParallelExecutor needs tensor_parallel_size >= 2, got {size}")
        self.size = size
        self.devices = worker_devices(config.device, size)
        self._failure: str | None = None
        self._store = _start_store(size)
        self.processes, self.conns, self.grammar_news = _spawn_workers(
            config, model_dir, self.devices, self._store.port
        )
        # Stop the workers however this object goes: explicit shutdown, garbage collection, exit.
        self._finalizer = weakref.finalize(
            self, _stop_workers, list(self.processes), [*self.conns, self.grammar_news]
        )
        try:
            self._collect()  # every rank has loaded its shard
        except BaseException:
            # Interrupted while the ranks load (Ctrl-C): a traceback kept for display (a notebook's,
            # an interactive prompt's) keeps this object alive, and with it the loading workers.
            self._stop_all("start-up was interrupted")
            raise

    @property
    def worker_pids(self) -> list[int | None]:
        return [process.pid for process in self.processes]

    def initialize_kv_cache(self) -> ModelFacts:
        """Each rank measures its room; all allocate the minimum so block ids mean the same everywhere."""
        per_rank = [_expect(result, int) for result in self._call_all(MeasureKVBlocks())]
        num_blocks = min(per_rank)
        logger.info("tensor parallel: KV blocks per rank %s -> %d", per_rank, num_blocks)
        return _expect(self._call_all(AllocateKVCache(num_blocks))[0], ModelFacts)

    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        # Encoded once for all ranks; block tables travel as appends (see wire.py).
        return _expect(self._call_all(ExecuteStep(encode_step(scheduled)))[0], ModelRunnerOutput)

    def grammars(self) -> TensorParallelGrammars:
        """The core's GrammarCompiles over these workers (it holds this executor, not the reverse:
        no cycle delays the finalizer)."""
        return TensorParallelGrammars(self, self.grammar_news)

    def call_grammars(self, call: GrammarCall) -> list[GrammarNews]:
        """A grammar call to every rank; each rank's answer, in rank order."""
        return [_expect(result, GrammarNews) for result in self._call_all(call)]

    def check_health(self) -> None:
        """Raise TensorParallelError if a worker has exited (the engine core calls this while idle)."""
        self._raise_if_failed()
        for rank, process in enumerate(self.processes):
            if not process.is_alive():
                self._fail(_exit_message(rank, process))

    def shutdown(self) -> None:
        """Stop every worker (gracefully, then by force). Safe to call more than once."""
        self._finalizer()

    def _call_all(self, call: WorkerCall) -> list[WorkerResult]:
        self._raise_if_failed()
        message = pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(message)
            except (BrokenPipeError, OSError):
                self._fail(_exit_message(rank, self.processes[rank]))
        try:
            return self._collect()
        except TensorParallelError:
            raise
        except BaseException:
            # Interrupted (e.g. Ctrl-C in LLM.generate) with replies outstanding: the ranks are out of
            # step with us and with each other, so they cannot be used again.
            self._stop_all(f"a {call.name!r} call to the workers was interrupted")
            raise

    def _collect(self) -> list[WorkerResult]:
        """One reply per rank, in rank order; a worker error or exit fails the whole executor."""
        replies: dict[int, WorkerResult] = {}
        sentinels = {process.sentinel: rank for rank, process in enumerate(self.processes)}
        while len(replies) < self.size:
            pending = [conn for rank, conn in enumerate(self.conns) if rank not in replies]
            for ready in wait([*pending, *sentinels]):
                if isinstance(ready, int):
                    self._on_worker_exit(sentinels[ready])
                else:
                    rank = self.conns.index(ready)  # type: ignore[arg-type]
                    replies[rank] = self._receive(rank)
        return [replies[rank] for rank in range(self.size)]

    def _receive(self, rank: int) -> WorkerResult:
        try:
            reply: FromWorker = self.conns[rank].recv()
        except (EOFError, OSError):
            self._fail(_exit_message(rank, self.processes[rank]))
        if not isinstance(reply, WorkerReply):
            self._fail(f"tensor-parallel worker {reply.reason}", refused=reply.refused)
        return reply.result

    def _on_worker_exit(self, rank: int) -> None:
        # A worker that failed sends its error before exiting: prefer that message to the exit code.
        conn = self.conns[rank]
        with contextlib.suppress(EOFError, OSError):
            if conn.poll():
                self._receive(rank)
        self.processes[rank].join(timeout=1.0)
        self._fail(_exit_message(rank, self.processes[rank]))

    def fail(self, reason: str) -> NoReturn:
        """Stop every worker and raise TensorParallelError naming `reason`."""
        self._fail(reason)

    def _fail(self, reason: str, refused: bool = False) -> NoReturn:
        self._stop_all(reason)
        raise (TensorParallelRefused if refused else TensorParallelError)(self._failure)

    def _stop_all(self, reason: str) -> None:
        if self._failure is not None:
            return
        self._failure = reason
        logger.error("tensor parallel: %s; stopping all workers", reason)
        # The survivors are blocked in collectives and would never read a polite "shutdown".
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        self.shutdown()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise TensorParallelError(self._failure)
        if not self._finalizer.alive:
            raise TensorParallelError("the tensor-parallel workers were shut down")


def _exit_message(rank: int, process: BaseProcess) -> str:
    # A worker's pipe closes as the kernel tears the process down, a moment before its exit status
    # can be collected: wait briefly so the message names how it ended.
    process.join(timeout=EXIT_STATUS_WAIT_S)
    code = process.exitcode
    how = "is still running but its pipe closed" if code is None else f"exited with code {code}"
    return f"tensor-parallel worker rank {rank} (pid {process.pid}) {how}"


def _start_store(world_size: int) -> Any:
    """A TCP store served here on a free localhost port; the workers rendezvous through it."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)


# The tokens a step writes for each decode row on the workers: one. The calls they are sent carry no
# draft tokens to verify (so the engine turns speculation off under tensor parallelism).
DECODE_ROW_TOKENS = 1


def _spawn_workers(
    config: EngineConfig, model_dir: Path, devices: list[str], store_port: int
) -> tuple[list[BaseProcess], list[Connection], Connection]:
    """The workers, the pipe to each, and the read end of the grammar news pipe they all write to."""
    context = multiprocessing.get_context("spawn")
    # Offline (LLM) the workers are this process's first children; in an engine-core process, the
    # front end's tracker is already running.
    start_resource_tracker_past_hangup()
    news, news_end = context.Pipe(duplex=False)
    threads = rank_threads(len(devices)) if devices[0] == "cpu" else 1
    log_level = logging.getLogger("batchlm").getEffectiveLevel()
    processes: list[BaseProcess] = []
    conns: list[Connection] = []
    with _may_have_children(), news_end:  # only the workers write: once all are gone, news sees EOF
        for rank, device in enumerate(devices):
            spec = WorkerSpec(
                config, model_dir, rank, len(devices), device, store_port, os.getpid(), threads, log_level,
                newest_decode_tokens=DECODE_ROW_TOKENS,
            )  # fmt: skip
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=worker_main,
                args=(spec, child_end, news_end),
                name=f"batchlm-tp-rank{rank}",
                daemon=True,
            )
            with sigterm_blocked_from_start():
                process.start()
            child_end.close()
            processes.append(process)
            conns.append(parent_end)
    return processes, conns, news


def rank_threads(size: int) -> int:
    """torch threads for each of `size` CPU ranks: an equal share of this process's threads, counted
    no higher than the CPUs it may run on (torch counts the host's cores, not a container's quota;
    ranks whose threads together outnumber the CPUs wait on descheduled threads at every op)."""
    from batchlm.runner.cpu_threads import available_cpus

    return max(1, min(torch.get_num_threads(), available_cpus()) // size)


@contextlib.contextmanager
def _may_have_children() -> Any:
    """Let a daemonic process (the engine core runs as one) start the workers.

    multiprocessing refuses children to daemons so that none is orphaned when the daemon is killed;
    our workers cannot be: each watches its parent and exits when it is gone, and the daemonic
    workers are terminated when this process exits.
    """
    current = multiprocessing.current_process()
    was_daemon = current.daemon
    if was_daemon:
        current.daemon = False
    try:
        yield
    finally:
        if was_daemon:
            current.daemon = True


def _stop_workers(processes: list[BaseProcess], conns: list[Connection]) -> None:
    message = pickle.dumps(StopWorker(), protocol=pickle.HIGHEST_PROTOCOL)
    for conn in conns:
        with contextlib.suppress(BrokenPipeError, OSError):
            conn.send_bytes(message)
    for process in processes:
        process.join(timeout=SHUTDOWN_GRACE_S)
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(timeout=SHUTDOWN_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()
    for conn in conns:
        conn.close()


def _expect(result: WorkerResult, kind: type[T]) -> T:
    """A worker's result as the type its call returns (the call decides it)."""
    if not isinstance(result, kind):
        raise TensorParallelError(f"a worker answered {type(result).__name__}, expected {kind.__name__}")
    return result
