"""`batchlm run-batch`: a file of requests in OpenAI's Batch API format (JSONL: `custom_id`, `method`,
`url`, `body`) run against a model in this process. Each request goes through the same server the API
serves, on a local port, so it is validated, templated and constrained exactly as it would be over
HTTP; the results are written in the Batch API's output format, one line per input line, in input order.
The file is read as the requests run, so its length is not bounded by memory."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys
import threading
from collections.abc import Coroutine, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from itertools import chain
from pathlib import Path
from typing import IO, Any

from batchlm.backends import BACKEND_CHOICES
from batchlm.batch_client import BatchProgress, run_lines
from batchlm.batch_file import OutputWriteError, count_requests, request_lines
from batchlm.flags import (
    Bounds,
    add_engine_arguments,
    bounded_number,
    dataclass_from_args,
    engine_flag_conflicts,
    non_empty_text,
)
from batchlm.logging_setup import LOG_LEVELS, configure_logging

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchlm.reasoning.registry import REASONING_PARSER_CHOICES
    from batchlm.tools.registry import TOOL_CALL_PARSER_CHOICES

    batch = parser.add_argument_group("batch")
    batch.add_argument(
        "-i",
        "--input-file",
        required=True,
        type=non_empty_text,
        help="the requests, one JSON object a line ('-': standard input)",
    )
    batch.add_argument(
        "-o",
        "--output-file",
        required=True,
        type=non_empty_text,
        help="where the results go, one a line in input order ('-': standard output); not the input file",
    )
    batch.add_argument(
        "--max-concurrency",
        type=bounded_number(int, Bounds(minimum=1)),
        default=256,
        help="requests in flight at once; the engine batches them (default: 256; at least 1)",
    )
    batch.add_argument(
        "--progress-interval",
        # Written whether or not anything finished: shorter intervals flooded the log.
        type=bounded_number(float, Bounds(minimum=0.1)),
        default=10.0,
        help="seconds between progress lines (default: 10; at least 0.1)",
    )
    batch.add_argument(
        "--backend", default="auto", choices=list(BACKEND_CHOICES), help="as for serve (default: auto)"
    )
    batch.add_argument(
        "--tool-call-parser",
        default="auto",
        choices=list(TOOL_CALL_PARSER_CHOICES),
        help="as for serve (default: auto)",
    )
    batch.add_argument(
        "--reasoning-parser",
        default="auto",
        choices=list(REASONING_PARSER_CHOICES),
        help="as for serve (default: auto)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=list(LOG_LEVELS), help="log level (default: INFO)"
    )
    add_engine_arguments(parser)


def check_args(args: argparse.Namespace) -> str | None:
    """A combination of flags in which one would be ignored, or None."""
    return engine_flag_conflicts(args)


@contextmanager
def _opened(path: str, standard: IO[Any], mode: str) -> Iterator[IO[Any]]:
    """The file at `path`, or the standard stream for '-' (left open)."""
    if path == "-":
        yield standard
        return
    with open(path, mode, encoding=None if "b" in mode else "utf-8") as handle:
        yield handle


def output_problem(output_file: str, input_file: str) -> str | None:
    """Why the results cannot go to `output_file`, found before the model loads; None if they can."""
    if output_file == "-":
        return None
    path = Path(output_file)
    if path.is_dir():
        return "it is a directory"
    if path.exists():
        if _is_input(path, input_file):
            # The input is read while the results are written: opening it for them would empty it.
            return "it is the input file"
        return None if os.access(path, os.W_OK) else "it is not writable"
    parent = path.resolve().parent
    if not (parent.is_dir() and os.access(parent, os.W_OK)):
        return f"{parent} is not a writable directory"
    return None


def _is_input(path: Path, input_file: str) -> bool:
    """Whether `path` is the input file, standard input redirected from a file (`< out.jsonl`) included."""
    if input_file != "-":
        return os.path.exists(input_file) and os.path.samefile(path, input_file)
    try:
        source = os.fstat(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):  # no standard input, or one without a descriptor
        return False
    return os.path.samestat(source, path.stat())


def _named(path: str) -> str:
    return "standard input" if path == "-" else path


class StopSignal:
    """SIGTERM (a scheduler, `kill`, a container stopping) and SIGHUP (the terminal closed; unless
    ignored, as under nohup) handled as Ctrl-C is: while the requests run, their task is cancelled,
    so that what finished is written; before that, KeyboardInterrupt. `exit_code` is what the stop
    exits with: 128 + the signal's number (143 after SIGTERM, 129 after SIGHUP, 130 after Ctrl-C)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @contextmanager
    def installed(self) -> Iterator[StopSignal]:
        # Python lets only its main thread set handlers (`batchlm run-batch` runs there).
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        signals = [signal.SIGTERM]
        hangup = getattr(signal, "SIGHUP", None)
        if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
            signals.append(hangup)
        previous = {signum: signal.signal(signum, self._handle) for signum in signals}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    async def running(self, work: Coroutine[Any, Any, BatchProgress]) -> BatchProgress:
        """Run `work` as the task a stop cancels."""
        self._task, self._loop = asyncio.current_task(), asyncio.get_running_loop()
        try:
            return await work
        finally:
            self._task = None

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGINT)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            return  # already stopping: the results that finished are being written
        self.received = signum
        if self._task is None or self._loop is None:
            raise KeyboardInterrupt
        # As asyncio's own Ctrl-C handler does, from inside the loop this main thread runs; the
        # call wakes a loop waiting in select() with no timeout.
        self._task.cancel()
        self._loop.call_soon_threadsafe(lambda: None)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    with ExitStack() as stack:
        stop = stack.enter_context(StopSignal().installed())
        try:
            source = stack.enter_context(_opened(args.input_file, sys.stdin.buffer, "rb"))
        except OSError as error:
            logger.error("cannot read %s: %s", args.input_file, error)
            return 2
        try:
            code = _run_from(args, source, stop)
        except KeyboardInterrupt:  # while the input was counted, before the model loaded
            logger.warning("run-batch: %s; no request ran", _stopped_by(stop))
            return stop.exit_code
    return code


def _stopped_by(stop: StopSignal) -> str:
    if stop.received in (None, signal.SIGINT):
        return "interrupted"
    return f"stopped by {signal.Signals(stop.received).name}"


def _run_from(args: argparse.Namespace, source: Iterable[bytes], stop: StopSignal) -> int:
    try:
        lines = request_lines(source)
        first = next(lines, None)
        total = count_requests(args.input_file)
    except OSError as error:
        logger.error("cannot read %s: %s", args.input_file, error)
        return 2
    if first is None:
        logger.error("%s holds no requests", _named(args.input_file))
        return 2
    problem = output_problem(args.output_file, args.input_file)
    if problem is not None:
        logger.error("cannot write %s: %s", args.output_file, problem)
        return 2
    progress = BatchProgress(total=total)
    try:
        return _run_served(args, chain([first], lines), progress, stop)
    except KeyboardInterrupt:
        # What finished is in the output already: run_lines writes it when cancelled, whole lines only.
        logger.warning(
            "run-batch: %s: %s; %s", _stopped_by(stop), progress.line(), _what_to_rerun(args, progress)
        )
        return stop.exit_code


def _what_to_rerun(args: argparse.Namespace, progress: BatchProgress) -> str:
    if not progress.done:
        return "no request finished"
    where = "standard output" if args.output_file == "-" else args.output_file
    return (
        f"their results are in {where} (complete JSONL lines, in input order); there is no resume: "
        "run the lines whose custom_id it lacks again"
    )


def _run_served(
    args: argparse.Namespace, lines: Iterable[bytes], progress: BatchProgress, stop: StopSignal
) -> int:
    """Load the model behind a local server and run the lines through it."""
    from batchlm.backends import create_engine
    from batchlm.config import EngineConfig
    from batchlm.server.background import BackgroundServer
    from batchlm.server.state import ServerSettings

    config = dataclass_from_args(EngineConfig, args)
    settings = ServerSettings(
        # The server listens on a local port while the batch runs: other users of this machine must
        # not be able to use it.
        api_key=secrets.token_urlsafe(32),
        max_queue=None,
        log_level=args.log_level,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        stored_responses=0,
        ui=False,
    )
    try:
        engine = create_engine(args.backend, config)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    engine.begin_loading()
    counted = "" if progress.total is None else f"{progress.total} "
    logger.info("run-batch: %srequests from %s", counted, _named(args.input_file))
    # Every backend's engine loads in start(), which is not part of the EngineClient interface.
    server = BackgroundServer(engine, settings, start_engine=engine.start)  # type: ignore[attr-defined]
    with server:
        try:
            server.wait_until_ready(timeout_s=3600)
        except (RuntimeError, TimeoutError) as error:  # why is logged where the engine failed
            logger.error("run-batch: %s; no request ran", error)
            return 1
        with ExitStack() as stack:
            try:
                out = stack.enter_context(_opened(args.output_file, sys.stdout, "w"))
            except OSError as error:
                logger.error("cannot write %s: %s; no request ran", args.output_file, error)
                return 2
            work = run_lines(
                server.base_url,
                lines,
                out,
                args.max_concurrency,
                args.progress_interval,
                progress,
                api_key=settings.api_key,
            )
            try:
                asyncio.run(stop.running(work))
            except asyncio.CancelledError:
                if stop.received is None:
                    raise
                raise KeyboardInterrupt from None  # SIGTERM or SIGHUP: ends as Ctrl-C does
            except OutputWriteError as error:
                if (
                    args.output_file == "-"
                ):  # a closed pipe: the interpreter's own flush at exit would fail too
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                logger.error(
                    "run-batch: cannot write %s: %s; stopped at %s", args.output_file, error, progress.line()
                )
                return 1
    logger.info("run-batch: %s; results in %s", progress.line(), args.output_file)
    return 0
