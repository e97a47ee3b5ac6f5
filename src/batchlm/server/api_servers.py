"""Extra API-server processes for `batchlm serve --api-servers N`: one event loop takes in and frames
every request of a burst, so its last requests reach the engine late while the GPU waits. Each process
runs its own loop and HTTP server on the same port (SO_REUSEPORT: the kernel spreads connections) and
its own pipe to the one engine core. The process `batchlm serve` started is the primary: it starts the
core and the others, forwards its shutdown to them, and stops the core only after they have drained."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

from batchlm.config import EngineConfig
from batchlm.gc_tuning import freeze_startup_objects
from batchlm.server.listener import bind_listener
from batchlm.server.state import ServerSettings

if TYPE_CHECKING:
    from batchlm.engine.client import EngineClient
    from batchlm.server.launcher import GracefulServer
    from batchlm.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# How often the primary checks that the other API servers are alive.
MONITOR_INTERVAL_S = 1.0
# Past their drain period, API servers that have not exited are killed after this margin.
STOP_MARGIN_S = 10.0
# What the primary sends an API server to stop at once, aborting its requests (its own second signal).
# Not SIGINT after begin_stop's SIGTERM: sent together, both would be pending at once and handled
# lowest number first, as a single request to drain.
FORCE_EXIT_SIGNAL = signal.SIGUSR1


def shared_port_unsupported_reason() -> str | None:
    """None when several processes can share a port with the kernel balancing connections between
    them; otherwise why not."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        return "several API servers need Linux (SO_REUSEPORT spreads connections across them)"
    return None


def automatic_api_servers(device: str, backend: str, cpus: int | None = None) -> int:
    """--api-servers when not given: 2 for the torch engine on an NVIDIA GPU with at least 8 CPUs; 1 on
    a CPU engine, which needs the cores itself. With --device auto the GPU is assumed when the NVIDIA
    driver's device node exists (this process does not import torch)."""
    if backend != "torch" or shared_port_unsupported_reason() is not None:
        return 1
    on_gpu = device.startswith("cuda") or (device == "auto" and Path("/dev/nvidiactl").exists())
    if not on_gpu:
        return 1
    if cpus is None:
        cpus = len(os.sched_getaffinity(0))
    return 2 if cpus >= 8 else 1


def bind_shared_port(host: str, port: int) -> socket.socket:
    """A listening socket on host:port that other processes can bind too (SO_REUSEPORT)."""
    return bind_listener(host, port, shared=True)


def bind_first_shared_port(host: str, port: int) -> socket.socket:
    """The primary's socket: as bind_shared_port, but refused (OSError) when anything already listens
    on the port. The kernel lets any process of the same user that shares its port join it, so another
    server started with --api-servers on the same port would otherwise take a share of its
    connections; an exclusive bind first finds the port in use, as a single server's does."""
    with bind_listener(host, port) as exclusive:
        port = exclusive.getsockname()[1]
    return bind_shared_port(host, port)


@dataclass(frozen=True)
class ApiServerStarted:
    """An extra API server's report on its status pipe: it serves the port."""

    pid: int


@dataclass(frozen=True)
class ApiServerFailed:
    reason: str


ApiServerStatus = ApiServerStarted | ApiServerFailed


@dataclass
class _Member:
    index: int
    process: BaseProcess
    # The child reports ApiServerStarted or ApiServerFailed here once.
    status: Connection


class ApiServerPool:
    """The API servers beside the primary: started when the engine core starts (AsyncLLMEngine
    share_core's callback), awaited before the primary says it is ready, stopped before the core."""

    def __init__(self, settings: ServerSettings, config: EngineConfig) -> None:
        # With the port the primary bound: the others bind the same one.
        self.settings = settings
        self.config = config
        self._members: list[_Member] = []
        self._stopping = False
        self._reported_exit: set[int] = set()

    def start(self, model_dir: Path, conns: list[Connection]) -> None:
        context = multiprocessing.get_context("spawn")
        for index, conn in enumerate(conns, start=1):
            status_reader, status_writer = context.Pipe(duplex=False)
            spec = ApiServerSpec(index, self.settings, self.config, model_dir, conn, status_writer)
            process = context.Process(
                target=api_server_main,
                args=(spec,),
                name=f"batchlm-api-server-{index}",
                daemon=True,
            )
            process.start()
            # Only the child may hold its pipe to the core: when it exits, the core must see the
            # pipe close and abort its requests.
            conn.close()
            status_writer.close()
            self._members.append(_Member(index, process, status_reader))
        logger.info("started %d more API server process(es) on port %d", len(conns), self.settings.port)

    async def wait_ready(self) -> None:
        """Returns once every API server serves; raises RuntimeError naming one that failed."""
        loop = asyncio.get_running_loop()
        for member in self._members:
            status = await loop.run_in_executor(None, _await_status, member)
            if isinstance(status, ApiServerFailed) and not self._stopping:  # stopped while starting: fine
                raise RuntimeError(f"API server {member.index} failed to start: {status.reason}")

    async def monitor(self, engine_stopped: Callable[[], bool]) -> None:
        """Log an API server that exits while the pool is not stopping (the others carry on serving
        the port: the kernel stops sending connections to a closed socket). Once the engine has
        stopped, each exits by design (its own log says so) and none serves any more."""
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            for member in self._members:
                if self._stopping or member.process.is_alive() or member.index in self._reported_exit:
                    continue
                self._reported_exit.add(member.index)
                _forget_metrics_of(member.process)
                if engine_stopped():
                    logger.info("API server %d exited: the engine stopped", member.index)
                    continue
                logger.error(
                    "API server %d exited unexpectedly (exit code %s); the other processes keep serving",
                    member.index,
                    member.process.exitcode,
                )

    def begin_stop(self) -> None:
        """Ask every API server to drain and exit (SIGTERM: the same graceful stop as the primary's)."""
        self._stopping = True
        for member in self._members:
            if member.process.is_alive():
                with contextlib.suppress(OSError):
                    member.process.terminate()

    def force_stop(self) -> None:
        """A second signal to the primary: every API server aborts its in-flight requests now, as the
        primary does, instead of draining them for the rest of its drain period."""
        self._stopping = True
        for member in self._members:
            if member.process.is_alive() and member.process.pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(member.process.pid, FORCE_EXIT_SIGNAL)

    async def stop(self) -> None:
        """Stop them all; those still running past their drain period (plus a margin) are killed."""
        self.begin_stop()
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.shutdown_timeout_s + STOP_MARGIN_S
        for member in self._members:
            remaining = max(0.1, deadline - time.monotonic())
            await loop.run_in_executor(None, member.process.join, remaining)
            if member.process.is_alive():
                logger.warning("API server %d did not stop in time; killing it", member.index)
                member.process.kill()
                await loop.run_in_executor(None, member.process.join, 5.0)
            _forget_metrics_of(member.process)
            with contextlib.suppress(OSError):
                member.status.close()


def _await_status(member: _Member) -> ApiServerStatus:
    while not member.status.poll(0.2):
        if not member.process.is_alive():
            return ApiServerFailed(f"the process exited with code {member.process.exitcode}")
    try:
        status: ApiServerStatus = member.status.recv()
    except (EOFError, OSError):
        return ApiServerFailed(f"the process exited with code {member.process.exitcode}")
    return status


def _forget_metrics_of(process: BaseProcess) -> None:
    """Drop the live gauges (requests in flight) of an exited process; its counters still count."""
    from batchlm.server.metrics import MULTIPROCESS_DIR_ENV

    if process.pid is not None and os.environ.get(MULTIPROCESS_DIR_ENV):
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(process.pid)


# -- inside an API-server process --------------------------------------------------------------------


@dataclass(frozen=True)
class ApiServerSpec:
    """What one API-server process other than the primary needs (sent to it at spawn)."""

    index: int
    # The primary's settings, with the port it bound (never 0 here) and the number of API servers.
    settings: ServerSettings
    config: EngineConfig
    model_dir: Path
    # Its pipe to the engine core, and the pipe on which it reports ApiServerStarted or ApiServerFailed.
    core: Connection
    status: Connection


def api_server_main(spec: ApiServerSpec) -> None:
    """Entry point of an API-server process other than the primary."""
    from batchlm.logging_setup import configure_logging

    # The primary turns Ctrl-C, and a closed terminal's hangup, into SIGTERM for this process (and a
    # second signal into FORCE_EXIT_SIGNAL): both, sent to the whole process group, are ignored here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(FORCE_EXIT_SIGNAL, signal.SIG_IGN)  # until it serves (its default ends the process)
    configure_logging(spec.settings.log_level, tag=f"api-server-{spec.index}")
    # The tokenizer (transformers' import, then the file) is the longest part of this process's
    # start: it loads on a thread while the server's own modules import.
    from batchlm.models.model_source import load_tokenizer

    tokenizer = concurrent.futures.ThreadPoolExecutor(1).submit(load_tokenizer, spec.config, spec.model_dir)
    from batchlm.server.launcher import run_event_loop

    sys.exit(run_event_loop(_serve_attached(spec, tokenizer)))


async def _serve_attached(spec: ApiServerSpec, tokenizer: concurrent.futures.Future[Tokenizer]) -> int:
    from batchlm.engine.async_engine import AsyncLLMEngine
    from batchlm.server.app import build_app
    from batchlm.server.launcher import GracefulServer, serve

    settings = spec.settings
    engine = AsyncLLMEngine.attached(
        spec.config,
        spec.core,
        spec.model_dir,
        max_queue=settings.max_queue,
        front_ends=settings.api_servers or 1,
        tokenizer=tokenizer,
    )
    app = build_app(engine, settings, log_stats=False)
    try:
        await engine.start()
        sock = bind_shared_port(settings.host, settings.port)
    except Exception as error:
        _report(spec.status, ApiServerFailed(f"{type(error).__name__}: {error}"))
        await engine.shutdown()
        return 1
    # As the primary does once its engine is up, and before this process counts as serving: a full
    # collection while serving would otherwise walk transformers' and the tokenizer's objects.
    freeze_startup_objects()
    # Only the primary's SIGTERM stops it (SIGINT and SIGHUP stay ignored): a Ctrl-C, which reaches
    # this process too, followed by that SIGTERM would otherwise count as two signals, a forced exit.
    server = GracefulServer(app, signals=(signal.SIGTERM,))
    signal.signal(FORCE_EXIT_SIGNAL, lambda signum, frame: server.force())
    watchdog = asyncio.ensure_future(_exit_when_engine_stops(engine, server, spec.index))
    _report(spec.status, ApiServerStarted(os.getpid()))
    try:
        return await serve(server, engine, sockets=[sock])
    finally:
        watchdog.cancel()


async def _exit_when_engine_stops(engine: EngineClient, server: GracefulServer, index: int) -> None:
    """The engine core gone (the primary stopped or crashed): this process has nothing to serve."""
    while not engine.is_dead:
        await asyncio.sleep(0.5)
    if not server.should_exit:
        logger.warning("API server %d: the engine stopped; exiting", index)
        server.should_exit = True


def _report(status: Connection, message: ApiServerStatus) -> None:
    with contextlib.suppress(OSError, BrokenPipeError):
        status.send(message)
