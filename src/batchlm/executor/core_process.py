"""Run an engine core behind message pipes: in its own process (default) or in a thread.

The messages are the classes of core_messages.py: ToCore one way, FromCore the other.

The core may serve several front ends (API-server processes), one pipe each. The first is the primary:
its "shutdown" or its pipe closing stops the core. Any other one leaving ("shutdown" or a closed pipe)
only detaches it: its requests are aborted and the core carries on. Each front end receives the
outputs of the requests it added, and every stats snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import assert_never

from batchlm.config import EngineConfig
from batchlm.core.engine_core import EngineCore
from batchlm.core.grammar_wait import GrammarCompiles
from batchlm.cpu_wait_policy import prefer_passive_waiting
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
from batchlm.outputs import CoreOutputs
from batchlm.request import EngineCoreRequest
from batchlm.stop_signals import ignore_stop_signals

logger = logging.getLogger(__name__)

# How often a starting core checks that its front end still lives (seconds).
ORPHAN_POLL_S = 0.2
# How long an idle core waits for a message before checking again (seconds).
IDLE_POLL_S = 0.5
# With several front ends, one with no outputs in a step still gets the stats this often (seconds),
# instead of a wake-up every step.
STATS_REFRESH_S = 0.05


def engine_core_main(
    config: EngineConfig,
    model_dir: Path,
    conn: Connection | Sequence[Connection],
    log_level: int | None = None,
) -> None:
    """Entry point of the engine-core process (or thread); `conn` is one pipe, or one per front end
    (the primary first)."""
    conns = [conn] if isinstance(conn, Connection) else list(conn)
    started = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C, and the hangup of a closed terminal, reach the whole process group; the front end
        # decides when the core stops (graceful drain), so the core ignores the signals and exits
        # when told or orphaned.
        ignore_stop_signals()
        _exit_if_orphaned_while_starting(started)
    if log_level is not None:
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        prefer_passive_waiting(config.device)  # before anything loads torch, and libgomp with it
        configure_child_threads()
        from batchlm.executor.core_builder import build_engine_core

        core, info = build_engine_core(config, model_dir)
    except Exception as exc:  # report every start-up failure to the front end, then exit
        logger.debug("engine core failed to start", exc_info=True)
        for each in conns:
            _send(each, CoreFailed(f"{type(exc).__name__}: {exc}"))
        return
    finally:
        started.set()
    for each in conns:
        _send(each, CoreReady(info))
    loop = CoreLoop(core, conns)
    try:
        loop.run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.info("front end went away; engine core exiting")
    except Exception as exc:
        # The traceback goes to this process's log; the front ends, and through them the clients'
        # 503s, get one line.
        logger.error("engine core crashed:\n%s", traceback.format_exc())
        for each in conns:
            _send(each, CoreFailed.after(exc))
        raise
    finally:
        loop.close()


def _exit_if_orphaned_while_starting(started: threading.Event) -> None:
    """Exit at once if the front end dies (SIGKILL, out of memory) before `started` is set: loading
    reads no pipe, so a core would otherwise go on loading (a large model: minutes, holding its
    memory) only to find the pipe closed. Once started, the closed pipe ends the core's loop."""
    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None and parent.pid is not None else os.getppid()

    def watch() -> None:
        while not started.wait(ORPHAN_POLL_S):
            if os.getppid() != parent_pid:
                logger.warning("the front end exited while the engine core was starting; exiting")
                os._exit(1)

    threading.Thread(target=watch, name="batchlm-core-orphan-watch", daemon=True).start()


def _send(conn: Connection, message: FromCore) -> None:
    with contextlib.suppress(BrokenPipeError, EOFError, OSError):
        conn.send(message)


class CoreLoop:
    """Busy: drain messages without waiting, then step. Idle: block on the pipes.

    With one front end every output goes to it. With several, each request's outputs go to the front
    end that added it (`_owner`, kept until the request finishes)."""

    def __init__(self, core: EngineCore, conns: Connection | Sequence[Connection]) -> None:
        self.core = core
        # Stand-in cores (tests) without grammar compiles step whenever they have work.
        self._can_step: Callable[[], bool] = getattr(core, "can_step", core.has_work)
        self._grammars: GrammarCompiles | None = getattr(core, "grammars", None)
        # Index = front end; None once a secondary front end has left.
        self._conns: list[Connection | None] = [conns] if isinstance(conns, Connection) else list(conns)
        self._owner: dict[str, int] = {}
        # time.monotonic() of the last message to each front end.
        self._last_sent = [0.0] * len(self._conns)
        self.running = True

    @property
    def conn(self) -> Connection:
        """The primary front end's pipe."""
        primary = self._conns[0]
        assert primary is not None
        return primary

    def run(self) -> None:
        while self.running:
            self._drain_messages(wait_for_one=not self._can_step())
            if not self.running:
                break
            if self._can_step():
                outputs = self.core.step()
                # The last step before idling brings every front end its final stats.
                self._send_outputs(outputs, everyone=not self.core.has_work())

    def close(self) -> None:
        """Stop compiling grammars, without waiting for one under way (its thread ends by itself)."""
        if self._grammars is not None:
            self._grammars.close()

    def _live(self) -> list[Connection]:
        return [conn for conn in self._conns if conn is not None]

    def _drain_messages(self, wait_for_one: bool) -> None:
        timeout = IDLE_POLL_S if wait_for_one else 0.0
        # While requests wait for their grammar, a finished compile ends the wait too (the step that
        # follows takes it; the pipe stays readable until then, so it is watched in this first wait only).
        grammars = self._grammars
        wakeup = [grammars.wakeup] if wait_for_one and grammars is not None else []
        while ready := wait([*self._live(), *wakeup], timeout):
            timeout, wakeup = 0.0, []
            for conn in ready:
                assert isinstance(conn, Connection)
                if conn not in self._conns:
                    continue  # the grammars' wakeup
                client = self._conns.index(conn)
                try:
                    message: ToCore = conn.recv()
                except (EOFError, OSError):
                    if client == 0:
                        raise EOFError("the primary front end closed its pipe") from None
                    self._detach(client)
                    continue
                self._handle(client, message)
                if not self.running:
                    return
        if wait_for_one and not self._can_step():
            self._check_executor()
            # Keep the stats fresh for /metrics while idle.
            self._send_outputs(CoreOutputs(), everyone=True)

    def _send_outputs(self, outputs: CoreOutputs, everyone: bool = False) -> None:
        """Each front end gets its requests' outputs and the stats; with several front ends, one
        without outputs gets the stats only every STATS_REFRESH_S, or now when `everyone`."""
        stats = self.core.stats()
        if len(self._conns) == 1:
            self.conn.send(StepOutputs(outputs, stats))
            return
        # Positions of each front end's outputs, routed in one pass.
        routed: list[list[int]] = [[] for _ in self._conns]
        owner_of = self._owner.get
        for index, request_id in enumerate(outputs.request_ids):
            routed[owner_of(request_id, 0)].append(index)
        for request_id in outputs.finished_request_ids():
            self._owner.pop(request_id, None)
        now = time.monotonic()
        for client, conn in enumerate(self._conns):
            mine = routed[client]
            stale = everyone or now - self._last_sent[client] >= STATS_REFRESH_S
            if conn is None or not (mine or stale):
                continue
            self._last_sent[client] = now
            self._send_to(client, StepOutputs(outputs.select(mine), stats))

    def _send_to(self, client: int, message: FromCore) -> None:
        """Send to one front end; a secondary whose pipe broke is detached (the primary's error stops
        the core)."""
        conn = self._conns[client]
        if conn is None:
            return
        try:
            conn.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            if client == 0:
                raise
            self._detach(client)

    def _detach(self, client: int) -> None:
        """A secondary front end left: abort its requests (their outputs have nowhere to go)."""
        conn = self._conns[client]
        self._conns[client] = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
        orphans = [request_id for request_id, owner in self._owner.items() if owner == client]
        for request_id in orphans:
            del self._owner[request_id]
        if orphans:
            self.core.abort_requests(orphans)
        logger.info("front end %d left; aborted its %d request(s)", client, len(orphans))

    def _check_executor(self) -> None:
        # Executors with worker processes (tensor parallel) raise on a dead worker even while idle.
        check_health = getattr(self.core.executor, "check_health", None)
        if check_health is not None:
            check_health()

    def _handle(self, client: int, message: ToCore) -> None:
        match message:
            case AddRequests(requests):
                for request in requests:
                    self._add(client, request)
            case AbortRequests(request_ids):
                outputs = self.core.abort_requests(request_ids)
                if outputs:
                    self._send_outputs(CoreOutputs.of(outputs))
            case Shutdown():
                if client == 0:
                    self.running = False
                else:
                    self._detach(client)
            case _:
                assert_never(message)

    def _add(self, client: int, request: EngineCoreRequest) -> None:
        several = len(self._conns) > 1
        if several and request.request_id in self._owner:
            self._send_to(client, RequestRejected(request.request_id, "request id already in use"))
            return
        try:
            self.core.add_request(request)
        except ValueError as exc:
            self._send_to(client, RequestRejected(request.request_id, str(exc)))
            return
        if several:
            self._owner[request.request_id] = client


def configure_child_threads() -> None:
    """Apply BATCHLM_CORE_THREADS (torch's thread count in the engine core) when it is set; raises
    ValueError naming the variable for a value that is not a positive integer. Without it torch keeps
    its default, one thread per core, capped by the model runner at the CPUs actually available."""
    from batchlm.runner.cpu_threads import threads_from_env

    threads = threads_from_env()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
