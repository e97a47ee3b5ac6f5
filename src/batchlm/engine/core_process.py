"""Run an engine core behind a message pipe: in its own process (default) or in a thread.

Messages to the core: ("add", [EngineCoreRequest]), ("abort", [request ids]), ("shutdown", None).
Messages from the core: ("ready", CoreInfo), ("failed", text), ("outputs", (PackedOutputs,
SchedulerStats)), ("rejected", (request id, message)). Step outputs travel packed (see pack_outputs).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from batchlm.config import EngineConfig
from batchlm.core.engine_core import EngineCore
from batchlm.outputs import EngineCoreOutput
from batchlm.request import EngineCoreRequest

logger = logging.getLogger(__name__)

# How long an idle core waits for a message before checking again (seconds).
IDLE_POLL_S = 0.5


def engine_core_main(config: EngineConfig, model_dir: Path, conn: Connection, log_level: int | None = None) -> None:
    """Entry point of the engine-core process (or thread)."""
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C reaches the whole process group; the front end decides when the core stops
        # (graceful drain), so the core ignores the signals and exits when told or orphaned.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if log_level is not None:
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        configure_child_threads()
        from batchlm.engine.core_builder import build_engine_core

        core, info = build_engine_core(config, model_dir)
    except Exception as exc:  # report every start-up failure to the front end, then exit
        logger.debug("engine core failed to start", exc_info=True)
        _send(conn, ("failed", f"{type(exc).__name__}: {exc}"))
        return
    _send(conn, ("ready", info))
    try:
        CoreLoop(core, conn).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.info("front end went away; engine core exiting")
    except Exception:
        logger.error("engine core crashed:\n%s", traceback.format_exc())
        _send(conn, ("failed", traceback.format_exc(limit=5)))
        raise


# One step's outputs on the pipe: request ids, new token ids, and the few outputs that carry more
# than that (a finish, logprobs, cached tokens, an error, a scheduled time) whole, by position.
PackedOutputs = tuple[list[str], list[tuple[int, ...]], list[tuple[int, EngineCoreOutput]]]


def pack_outputs(outputs: list[EngineCoreOutput]) -> PackedOutputs:
    """Columns instead of objects: pickling 256 outputs drops from ~0.25 ms to ~0.02 ms, host time the
    core's step loop otherwise spends beside a ~5 ms GPU step."""
    request_ids: list[str] = []
    token_ids: list[tuple[int, ...]] = []
    whole: list[tuple[int, EngineCoreOutput]] = []
    for index, output in enumerate(outputs):
        request_ids.append(output.request_id)
        token_ids.append(output.new_token_ids)
        if (
            output.finish_reason is not None
            or output.new_logprobs
            or output.num_cached_tokens
            or output.scheduled_time is not None
            or output.error is not None
            or output.stop_token_id is not None
        ):
            whole.append((index, output))
    return request_ids, token_ids, whole


def unpack_outputs(packed: PackedOutputs) -> list[EngineCoreOutput]:
    request_ids, token_ids, whole = packed
    outputs = [EngineCoreOutput(request_id, tokens) for request_id, tokens in zip(request_ids, token_ids, strict=True)]
    for index, output in whole:
        outputs[index] = output
    return outputs


def _send(conn: Connection, message: tuple[str, Any]) -> None:
    with contextlib.suppress(BrokenPipeError, EOFError, OSError):
        conn.send(message)


class CoreLoop:
    """Busy: drain messages without waiting, then step. Idle: block on the pipe."""

    def __init__(self, core: EngineCore, conn: Connection) -> None:
        self.core = core
        self.conn = conn
        self.running = True

    def run(self) -> None:
        while self.running:
            self._drain_messages(wait=not self.core.has_work())
            if not self.running:
                break
            if self.core.has_work():
                outputs = self.core.step()
                self.conn.send(("outputs", (pack_outputs(outputs), self.core.stats())))

    def _drain_messages(self, wait: bool) -> None:
        timeout = IDLE_POLL_S if wait else 0.0
        while self.conn.poll(timeout):
            kind, payload = self.conn.recv()
            self._handle(kind, payload)
            timeout = 0.0
            if not self.running:
                return
        if wait and not self.core.has_work():
            self._check_executor()
            # Keep the stats fresh for /metrics while idle.
            self.conn.send(("outputs", (pack_outputs([]), self.core.stats())))

    def _check_executor(self) -> None:
        # Executors with worker processes (tensor parallel) raise on a dead worker even while idle.
        check_health = getattr(self.core.executor, "check_health", None)
        if check_health is not None:
            check_health()

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            for request in payload:
                self._add(request)
        elif kind == "abort":
            outputs = self.core.abort_requests(payload)
            if outputs:
                self.conn.send(("outputs", (pack_outputs(outputs), self.core.stats())))
        elif kind == "shutdown":
            self.running = False
        else:
            logger.error("unknown message %r", kind)

    def _add(self, request: EngineCoreRequest) -> None:
        try:
            self.core.add_request(request)
        except ValueError as exc:
            self.conn.send(("rejected", (request.request_id, str(exc))))


def configure_child_threads() -> None:
    """Apply BATCHLM_CORE_THREADS (torch's thread count in the engine core) when it is set; raises
    ValueError naming the variable for a value that is not a positive integer. Without it torch keeps
    its default, one thread per core, capped by the model runner at the CPUs actually available."""
    from batchlm.runner.cpu_threads import threads_from_env

    threads = threads_from_env()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
