"""A tensor-parallel worker process: one rank's ModelRunner, driven over a pipe by the executor.

Protocol (messages.py): the executor sends each WorkerCall pickled once, with send_bytes, to
every rank; a rank answers WorkerReply or, failing, WorkerFailed. Only rank 0 returns the
ModelRunnerOutput of an ExecuteStep; the other ranks answer WorkerReply(None). Grammars compile on the
rank's background threads between calls; a finished compile writes an empty message to the news pipe
(shared by all ranks), and the executor then asks every rank with TakeGrammars.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, assert_never

from batchlm.config import EngineConfig
from batchlm.executor.messages import (
    AllocateKVCache,
    CompileGrammar,
    DiscardGrammars,
    ExecuteStep,
    FromWorker,
    GrammarNews,
    MeasureKVBlocks,
    StopWorker,
    TakeGrammars,
    WorkerCall,
    WorkerFailed,
    WorkerReply,
    WorkerResult,
)
from batchlm.executor.wire import decode_step

if TYPE_CHECKING:
    from batchlm.runner.model_runner import ModelRunner
    from batchlm.structured.compiles import BackgroundCompiles

logger = logging.getLogger(__name__)

# Multi-GPU hosts we run on must not use NVLink multicast (NVLS); set before NCCL initialises.
NCCL_ENV_DEFAULTS = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# How often a worker checks that the process that started it is still alive (seconds).
ORPHAN_POLL_S = 1.0
# How long ranks wait for each other at start-up (store rendezvous and the process group).
RENDEZVOUS_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker needs to start; pickled into the spawned process."""

    config: EngineConfig
    model_dir: Path
    rank: int
    world_size: int
    # "cpu" or "cuda:N": the device this rank runs on.
    device: str
    # Port of the TCP store the executor serves on 127.0.0.1 (rendezvous for torch.distributed).
    store_port: int
    # Process id of the executor's process; the worker exits when it is gone.
    parent_pid: int
    # torch intra-op threads for this rank (CPU ranks share the machine's cores).
    num_threads: int
    # Logging level of the parent (None: leave logging unconfigured).
    log_level: int | None = None
    # Most of a decode row's last tokens a step writes (AttentionBackend.newest_decode_tokens); None:
    # unknown, the decode attention reads again all it read before the step's KV write.
    newest_decode_tokens: int | None = None


def worker_main(spec: WorkerSpec, conn: Connection, news: Connection | None = None) -> None:
    """Entry point of a worker process: start the rank, then serve the executor until told to stop.
    news: the pipe on which a finished grammar compile is announced (None: not announced)."""
    _prepare_process(spec)
    try:
        runner = _start_rank(spec)
    except Exception as exc:
        logger.debug("tensor-parallel rank %d failed to start", spec.rank, exc_info=True)
        reason = f"rank {spec.rank} failed to start: {type(exc).__name__}: {exc}"
        _send(conn, WorkerFailed(reason, refused=isinstance(exc, ValueError)))
        return
    _send(conn, WorkerReply(None))
    try:
        serve(runner, spec.rank, conn, news)
    finally:
        _leave_process_group()


def _prepare_process(spec: WorkerSpec) -> None:
    # Ctrl-C and a closed terminal's hangup reach the whole process group; the executor decides when
    # workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Before this process starts threads of its own: they inherit the blocked SIGTERM (those its main
    # module's imports started already have it blocked from the executor: sigterm_blocked_from_start).
    _take_sigterm_from_parent_only(spec.parent_pid)
    if spec.log_level is not None:
        logging.basicConfig(level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, value in NCCL_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    threading.Thread(
        target=_exit_when_orphaned, args=(spec.parent_pid,), name="batchlm-tp-orphan-watch", daemon=True
    ).start()

    import torch

    torch.set_num_threads(spec.num_threads)


def _take_sigterm_from_parent_only(parent_pid: int) -> None:
    """SIGTERM ends this worker (its default action; the engine-core process ignores it and children
    inherit that) only when the executor's process sends it (`terminate()`, there or at its exit).
    Sent to the whole process group or service (`kill -- -PGID`, systemd stopping the unit), it is the
    front end's to act on, with a drain: the worker's death failed the engine under the streams being
    drained. Where a thread cannot take the signal with its sender, every SIGTERM ends the worker."""
    if not hasattr(signal, "sigwaitinfo"):  # macOS
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return
    # Blocked before its default action is back: a group's SIGTERM meanwhile must not end the worker.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(
        target=_wait_for_sigterm, args=(parent_pid,), name="batchlm-tp-sigterm", daemon=True
    ).start()


@contextlib.contextmanager
def sigterm_blocked_from_start() -> Iterator[None]:
    """Around a worker's start: SIGTERM blocked in this thread, so that every thread of the worker
    starts with it blocked (the mask is inherited across the spawn's exec), also those that its main
    module's imports start before worker_main (numpy's BLAS threads, in a script that imports it):
    one of those, taking a group's SIGTERM with its default action, ended the worker."""
    if not hasattr(signal, "sigwaitinfo"):  # macOS: the worker takes every SIGTERM
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _wait_for_sigterm(parent_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent_pid:
        pass
    # Taken back by its default action: unblocked in this thread only, the signal is delivered here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.kill(os.getpid(), signal.SIGTERM)


def _exit_when_orphaned(parent_pid: int) -> None:
    """Exit hard when the parent is gone: a rank blocked in a collective never reads its pipe's EOF."""
    while os.getppid() == parent_pid:
        time.sleep(ORPHAN_POLL_S)
    os._exit(1)


def _start_rank(spec: WorkerSpec) -> ModelRunner:
    """Join the process group (NCCL on GPUs, gloo on CPU) and load this rank's shard of the model."""
    import torch
    import torch.distributed as dist

    from batchlm.parallel.group import TensorParallelGroup
    from batchlm.runner.model_runner import ModelRunner

    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore(
        "127.0.0.1", spec.store_port, spec.world_size, is_master=False, timeout=RENDEZVOUS_TIMEOUT
    )
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=store,
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=RENDEZVOUS_TIMEOUT,
    )
    runner = ModelRunner(
        spec.config, spec.model_dir, tp=TensorParallelGroup.from_distributed(), device=device
    )
    runner.attn.newest_decode_tokens = spec.newest_decode_tokens  # before any warm-up or graph capture
    return runner


def serve(runner: ModelRunner, rank: int, conn: Connection, news: Connection | None = None) -> None:
    """Run the executor's calls in order until StopWorker or the pipe closes. A failed call ends the
    worker: its peers are blocked in collectives it will never join, so the executor stops them all."""
    grammars = RankGrammars(runner, news)
    while True:
        try:
            call: WorkerCall = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if isinstance(call, StopWorker):
            return
        try:
            result = _call(runner, grammars, call)
        except Exception as exc:
            # The error on the first line: that line is all the engine's clients are told (CoreFailed).
            first = f"rank {rank} failed in {call.name}: {type(exc).__name__}: {exc}".splitlines()[0]
            _send(conn, WorkerFailed(f"{first}\n{traceback.format_exc(limit=8)}"))
            return
        # Every rank samples the same token (same logits, same generator state); rank 0 answers.
        _send(conn, WorkerReply(result if rank == 0 or not isinstance(call, ExecuteStep) else None))


class RankGrammars:
    """The rank's grammar compiles (its runner's), made on first use, each finished one announced on
    the news pipe."""

    def __init__(self, runner: ModelRunner, news: Connection | None) -> None:
        self._runner = runner
        self._news = news
        self._compiles: BackgroundCompiles | None = None

    def compile(self, call: CompileGrammar) -> GrammarNews:
        ready = self.compiles.start_spec(call.token, call.spec, call.eos_token_ids)
        news = self.take()
        if ready:
            news.done[call.token] = None
        return news

    def discard(self, tokens: tuple[str, ...]) -> GrammarNews:
        self.compiles.discard(tokens)
        return self.take()

    def take(self) -> GrammarNews:
        return GrammarNews(self.compiles.take_done())

    @property
    def compiles(self) -> BackgroundCompiles:
        if self._compiles is None:
            self._compiles = self._runner.grammars.make_compiles(notify=self._announce)
        return self._compiles

    def _announce(self) -> None:
        """On a compile thread. One small write: atomic on the pipe the ranks share."""
        if self._news is None:
            return
        try:
            self._news.send_bytes(b"")
        except OSError:  # the executor went away; the rank ends with its pipe
            logger.debug("the grammar news pipe closed")


def _call(runner: ModelRunner, grammars: RankGrammars, call: WorkerCall) -> WorkerResult:
    match call:
        case ExecuteStep(encoded):
            return runner.execute(decode_step(encoded))
        case CompileGrammar():
            return grammars.compile(call)
        case TakeGrammars():
            return grammars.take()
        case DiscardGrammars(tokens):
            return grammars.discard(tokens)
        case MeasureKVBlocks():
            return runner.determine_num_blocks()
        case AllocateKVCache(num_blocks):
            return runner.allocate_kv_cache(num_blocks)
        case StopWorker():
            return None
        case _:
            assert_never(call)


def _send(conn: Connection, message: FromWorker) -> None:
    try:
        conn.send(message)
    except (BrokenPipeError, EOFError, OSError):
        logger.debug("the executor went away; %s dropped", type(message).__name__)


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # peers may be gone already; the process is exiting anyway
            logger.debug("destroy_process_group failed", exc_info=True)
