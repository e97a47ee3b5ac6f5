"""A server for any EngineClient running in a background thread on a free local port (tests, notebooks)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import TracebackType

from batchlm.engine.client import EngineClient
from batchlm.server.allowed_hosts import resolve_allowed_hosts
from batchlm.server.app import build_app
from batchlm.server.launcher import GracefulServer, serve
from batchlm.server.listener import bind_listener
from batchlm.server.state import ServerSettings, ServerState


class BackgroundServer:
    """`with BackgroundServer(engine) as server:` serves on `server.base_url` ("http://127.0.0.1:<port>")
    until the block ends, which drains in-flight requests and shuts the engine down like SIGTERM does.
    For an engine that still has to load, pass `start_engine=engine.start` and call wait_until_ready()."""

    def __init__(
        self,
        engine: EngineClient,
        settings: ServerSettings | None = None,
        *,
        start_engine: Callable[[], Awaitable[None]] | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self._socket = bind_listener("127.0.0.1", 0)
        self.port: int = self._socket.getsockname()[1]
        given = settings or ServerSettings()
        # Loopback only, as `batchlm serve` on 127.0.0.1: answers localhost's names alone (DNS rebinding).
        allowed = resolve_allowed_hosts(given.allowed_hosts, "127.0.0.1")
        self.settings = replace(given, host="127.0.0.1", port=self.port, allowed_hosts=allowed)
        self.engine = engine
        self.app = build_app(engine, self.settings)
        self.state: ServerState = self.app.state.batchlm
        self._server = GracefulServer(self.app)
        self._start_engine = start_engine
        self._startup_timeout_s = startup_timeout_s
        self._thread: threading.Thread | None = None
        self.exit_code: int | None = None
        self.error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread = threading.Thread(target=self._run, name=f"batchlm-server-{self.port}", daemon=True)
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server thread exited during start-up: {self.error!r}")
            if waited > self._startup_timeout_s:
                raise TimeoutError(f"the server did not start within {self._startup_timeout_s} s")
            self._thread.join(0.02)
            waited += 0.02
        return self

    def wait_until_ready(self, timeout_s: float = 300.0) -> BackgroundServer:
        """Block until the engine serves requests (start_engine finished); raise if it fails to start."""
        deadline = time.monotonic() + timeout_s
        while not self.engine.is_ready:
            if self.engine.is_dead or self._thread is None or not self._thread.is_alive():
                raise RuntimeError(f"the engine did not start (server exit code {self.exit_code})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine was not ready within {timeout_s} s")
            time.sleep(0.02)
        return self

    def _run(self) -> None:
        try:
            self.exit_code = asyncio.run(
                serve(self._server, self.engine, start_engine=self._start_engine, sockets=[self._socket])
            )
        except BaseException as error:  # reported by start() / stop(); a thread cannot raise to its owner
            self.error = error

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """Graceful stop (drain, then abort stragglers); returns the exit code serve() gave."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"the server did not stop within {timeout_s} s")
        self._socket.close()
        return self.exit_code

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
