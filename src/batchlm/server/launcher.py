"""Runs the app under uvicorn next to the engine: binds first (so /health answers 503 while the model
loads), starts the engine, and on SIGINT/SIGTERM/SIGHUP drains in-flight requests, shuts the engine
down, exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from types import FrameType
from typing import Any, Protocol, TypeVar

import uvicorn
from fastapi import FastAPI

from batchlm.engine.client import EngineClient, EngineDeadError
from batchlm.gc_tuning import freeze_startup_objects
from batchlm.server.http_protocol import ServerConfig
from batchlm.server.open_files import connection_limit
from batchlm.server.state import ServerState
from batchlm.startup_log import log_phase, log_uptime
from batchlm.stop_signals import stop_signals

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ExtraApiServers(Protocol):
    """The other API-server processes of `--api-servers N` (api_servers.ApiServerPool), as serve()
    drives them: this module sits below that one."""

    async def wait_ready(self) -> None: ...

    async def monitor(self, engine_stopped: Callable[[], bool]) -> None: ...

    def begin_stop(self) -> None: ...

    def force_stop(self) -> None: ...

    async def stop(self) -> None: ...


# Past the drain period uvicorn itself cancels what is left; this margin lets our aborts land first.
BACKSTOP_MARGIN_S = 5.0
# How often the drain checks whether the in-flight generations have finished.
DRAIN_POLL_S = 0.02


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that, once asked to stop, gives in-flight requests the drain period to finish,
    then aborts them in the engine (their streams end with an error event instead of being cut).
    The listener stays open while they drain: a request arriving meanwhile gets a 503 in OpenAI's
    shape (a client or balancer can retry elsewhere) rather than a refused connection."""

    def __init__(
        self,
        app: FastAPI,
        on_shutdown: Callable[[], None] | None = None,
        on_force_exit: Callable[[], None] | None = None,
        signals: tuple[int, ...] | None = None,
    ) -> None:
        self.state: ServerState = app.state.batchlm
        # The signals that stop it (stop_signals() when None).
        self._signals = signals
        # Called when the shutdown begins (the primary tells the other API servers to drain too).
        self._on_shutdown = on_shutdown
        # Called when a second signal forces the exit (the primary tells the others to abort theirs too).
        self._on_force_exit = on_force_exit
        # The first stop signal received (None until one comes).
        self._first_signal: int | None = None
        settings = self.state.settings
        config = ServerConfig(
            app,
            observe=self.state.metrics.count_error,
            max_header_bytes=settings.max_header_bytes,
            header_timeout_s=settings.header_timeout_s,
            max_connections=(
                settings.max_connections if settings.max_connections is not None else connection_limit()
            ),
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=settings.log_level.upper() == "DEBUG",
            timeout_keep_alive=settings.keep_alive_timeout_s,
            timeout_graceful_shutdown=int(settings.shutdown_timeout_s + BACKSTOP_MARGIN_S),
        )
        super().__init__(config)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the captured signal after shutting down, which would make a clean drain
        # exit with 130/143; here a handled signal means a normal exit.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = stop_signals() if self._signals is None else self._signals
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        forced = self.force_exit
        first = self._first_signal
        if first is None:
            self._first_signal = sig
        super().handle_exit(sig, frame)
        # A SIGINT and another signal pending together are handled lowest number first, whatever
        # order they were sent in: SIGTERM then SIGINT would be taken for SIGINT then SIGTERM, a
        # drain. So a second signal forces the exit when either of the two is a SIGINT.
        if first is not None and signal.SIGINT in (first, sig) and self.should_exit:
            self.force_exit = True
        if self.force_exit and not forced and self._on_force_exit is not None:
            self._on_force_exit()

    def force(self) -> None:
        """Stop now, aborting the requests in flight: what a second signal does."""
        self.should_exit = True
        self.force_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.state.shutting_down = True
        if self._on_shutdown is not None:
            self._on_shutdown()
        if in_flight := len(self.state.in_flight):
            # uvicorn says "Shutting down" only once they are done: without this line a drain is silent.
            logger.info(
                "shutting down: %d request(s) in flight get up to %.1f s to finish (SIGINT again: abort them now)",
                in_flight,
                self.state.settings.shutdown_timeout_s,
            )
        watchdog = asyncio.ensure_future(self._abort_after_drain_period())
        try:
            await self._wait_for_in_flight()
            await super().shutdown(sockets)
            if self.force_exit:
                # uvicorn skips the app's shutdown when forced; left pending, it is cancelled at exit
                # and logs a traceback. Ours only stops the stats task and closes the response store.
                await self.lifespan.shutdown()
        finally:
            watchdog.cancel()

    async def _wait_for_in_flight(self) -> None:
        """Until no generation is in flight (the watchdog aborts them after the drain period), or a
        second signal asks for a forced exit, which aborts them at once: their streams end with the
        server's abort error rather than with the engine gone from under them."""
        while len(self.state.in_flight) and not self.force_exit:
            await asyncio.sleep(DRAIN_POLL_S)
        if self.force_exit and (aborted := await self.state.in_flight.abort_all()):
            logger.warning("aborted %d request(s) still running: a second signal forced the exit", aborted)
            # A stream writes its abort error once the engine answers the abort (its next step): forced,
            # uvicorn waits for no connection, and would cut the streams where they stand.
            deadline = time.monotonic() + BACKSTOP_MARGIN_S
            while len(self.state.in_flight) and time.monotonic() < deadline:
                await asyncio.sleep(DRAIN_POLL_S)

    async def _abort_after_drain_period(self) -> None:
        timeout = self.state.settings.shutdown_timeout_s
        await asyncio.sleep(timeout)
        aborted = await self.state.in_flight.abort_all()
        if aborted:
            logger.warning(
                "aborted %d request(s) still running %.1f s after shutdown began", aborted, timeout
            )


async def serve(
    server: GracefulServer,
    engine: EngineClient,
    *,
    start_engine: Callable[[], Awaitable[None]] | None = None,
    sockets: list[socket.socket] | None = None,
    api_servers: ExtraApiServers | None = None,
) -> int:
    """Serve until stopped; 0 on a clean stop, 1 if the engine (or one of `api_servers`) failed to
    start. Stops `api_servers`, then shuts the engine down."""
    failed = False
    monitor: asyncio.Future[None] | None = None
    server.state.starting_api_servers = api_servers is not None

    async def start() -> None:
        nonlocal failed, monitor
        assert start_engine is not None
        log_uptime(logger, "front end: starting the engine")
        started = time.perf_counter()
        try:
            await start_engine()
            if api_servers is not None:
                await api_servers.wait_ready()
                server.state.starting_api_servers = False
        except Exception as error:
            # An engine's own start-up error already says that it failed to start.
            said = isinstance(error, EngineDeadError)
            message = str(error) if said else f"the engine failed to start: {error}"
            logger.error("%s", message, exc_info=logger.isEnabledFor(logging.DEBUG))
            failed = True
            server.should_exit = True
            return
        if api_servers is not None:
            monitor = asyncio.ensure_future(api_servers.monitor(lambda: engine.is_dead))
        log_phase(logger, "engine start (tokenizer, engine core)", time.perf_counter() - started)
        freeze_startup_objects()
        log_uptime(logger, "front end: ready")
        logger.info("engine ready, serving model %r", engine.model_info.served_model_name)
        if defaults := engine.model_info.sampling_defaults.describe():
            logger.info(
                "sampling defaults the model recommends: %s (a request's own values win; "
                "--generation-config none leaves OpenAI's)",
                defaults,
            )

    starting = asyncio.ensure_future(start()) if start_engine is not None else None
    try:
        await server.serve(sockets=sockets)
    finally:
        if starting is not None:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        if monitor is not None:
            monitor.cancel()
        if api_servers is not None:
            # They may still be draining streams: the engine must outlive them.
            await api_servers.stop()
        try:
            await engine.shutdown()
        except Exception:  # exiting anyway: report, do not mask the exit status
            logger.exception("the engine did not shut down cleanly")
    return 1 if failed else 0


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on uvloop when it is installed (faster sockets and timers)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result


def run_server(
    app: FastAPI,
    engine: EngineClient,
    *,
    start_engine: Callable[[], Awaitable[None]] | None = None,
    sockets: list[socket.socket] | None = None,
    api_servers: ExtraApiServers | None = None,
) -> int:
    """Blocking entry point of `batchlm serve` (signals are handled here, in the main thread)."""
    server = GracefulServer(
        app,
        on_shutdown=api_servers.begin_stop if api_servers is not None else None,
        on_force_exit=api_servers.force_stop if api_servers is not None else None,
    )
    return run_event_loop(
        serve(server, engine, start_engine=start_engine, sockets=sockets, api_servers=api_servers)
    )
