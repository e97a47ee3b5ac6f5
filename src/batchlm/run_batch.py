"""`batchlm run-batch`: a file of requests in OpenAI's Batch API format (JSONL: `custom_id`, `method`,
`url`, `body`) run against a model in this process. Each request goes through the same server the API
serves, on a local port, so it is validated, templated and constrained exactly as it would be over
HTTP; the results are written in the Batch API's output format, one line per input line, in input order.
The file is read as the requests run, so its length is not bounded by memory."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Coroutine, Iterable, Iterator, Sized
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from pathlib import Path
from typing import IO, Any

from batchlm.backends import BACKEND_CHOICES
from batchlm.batch_file import (
    OrderedWriter,
    OutputWriteError,
    count_requests,
    error_line,
    parse_line,
    request_lines,
    result_line,
)
from batchlm.flags import Bounds, add_engine_arguments, bounded_number, dataclass_from_args
from batchlm.logging_setup import LOG_LEVELS, configure_logging

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchlm.reasoning.registry import REASONING_PARSER_CHOICES
    from batchlm.tools.registry import TOOL_CALL_PARSER_CHOICES

    batch = parser.add_argument_group("batch")
    batch.add_argument(
        "-i", "--input-file", required=True, help="the requests, one JSON object a line ('-': standard input)"
    )
    batch.add_argument(
        "-o",
        "--output-file",
        required=True,
        help="where the results go, one a line in input order ('-': standard output); not the input file",
    )
    batch.add_argument(
        "--max-concurrency",
        type=bounded_number(int, Bounds(minimum=1)),
        default=256,
        help="requests in flight at once; the engine batches them (default: 256)",
    )
    batch.add_argument(
        "--progress-interval",
        type=bounded_number(float, Bounds(above=0)),
        default=10.0,
        help="seconds between progress lines (default: 10)",
    )
    batch.add_argument(
        "--backend", default="auto", choices=list(BACKEND_CHOICES), help="as for serve (default: auto)"
    )
    batch.add_argument(
        "--tool-call-parser", default="auto", choices=list(TOOL_CALL_PARSER_CHOICES), help="as for serve"
    )
    batch.add_argument(
        "--reasoning-parser", default="auto", choices=list(REASONING_PARSER_CHOICES), help="as for serve"
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=list(LOG_LEVELS), help="log level (default: INFO)"
    )
    add_engine_arguments(parser)


@dataclass
class BatchProgress:
    """Counts for the progress lines and the summary."""

    # None where the input cannot be counted before it is read (standard input).
    total: int | None
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    # Lines that ran and got an HTTP error, and lines that could not run at all.
    failed: int = 0
    invalid: int = 0
    completion_tokens: int = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = f"{self.done}" if self.total is None else f"{self.done}/{self.total}"
        return (
            f"{done} requests done ({self.failed} failed, {self.invalid} invalid), "
            f"{self.done / elapsed:.1f} requests/s, {self.completion_tokens / elapsed:.0f} output tokens/s"
        )


async def run_lines(
    base_url: str,
    lines: Iterable[str | bytes],
    out: IO[str],
    max_concurrency: int,
    progress_interval: float,
    progress: BatchProgress | None = None,
    api_key: str | None = None,
) -> BatchProgress:
    """Run every line against the server at `base_url` (sending `api_key` if given); results go to `out`
    in input order. Lines are read as there is room for them. Cancelled (Ctrl-C), the results that
    finished are written."""
    import aiohttp

    if progress is None:
        progress = BatchProgress(total=len(lines) if isinstance(lines, Sized) else None)
    progress.started = time.monotonic()  # the rates count from the first request, not the model load
    writer = OrderedWriter(out)
    seen: set[str] = set()
    told_model = False
    # At most max_concurrency requests in flight, started in input order, and no line read further
    # ahead of the first unwritten one than the window: memory stays bounded however long the file is.
    window = 4 * max_concurrency
    room = asyncio.Condition()
    in_flight: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=max_concurrency)
    timeout = aiohttp.ClientTimeout(total=None)

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with aiohttp.ClientSession(
        base_url, connector=connector, timeout=timeout, headers=headers
    ) as client:

        async def run_one(index: int, custom_id: str, url: str, body: dict[str, Any]) -> None:
            try:
                try:
                    async with client.post(url, json={**body, "model": "default"}) as response:
                        status, text = response.status, await response.text()
                except aiohttp.ClientError as error:  # the server went away: each line says so
                    progress.failed += 1
                    done(index, error_line(custom_id, "request_failed", f"{type(error).__name__}: {error}"))
                    return
                try:
                    answer = json.loads(text)
                except ValueError:
                    answer = {"error": {"message": text, "type": "server_error"}}
                if status != 200:
                    progress.failed += 1
                usage = answer.get("usage") if isinstance(answer, dict) else None
                if isinstance(usage, dict):
                    progress.completion_tokens += int(
                        usage.get("completion_tokens") or usage.get("output_tokens") or 0
                    )
                done(index, result_line(custom_id, status, answer))
            finally:
                in_flight.discard(asyncio.current_task())  # type: ignore[arg-type]
                async with room:
                    room.notify_all()

        def done(index: int, line: dict[str, Any]) -> None:
            progress.done += 1
            writer.put(index, line)

        def has_room(index: int, needs_slot: bool) -> bool:
            if writer.failure is not None:
                return True  # to stop at once
            return index - writer.next < window and (not needs_slot or len(in_flight) < max_concurrency)

        def stop_if_unwritable() -> None:
            if writer.failure is not None:
                raise OutputWriteError(str(writer.failure)) from writer.failure

        async def report() -> None:
            while True:
                await asyncio.sleep(progress_interval)
                logger.info("run-batch: %s", progress.line())

        reporter = asyncio.ensure_future(report())
        try:
            for index, text in enumerate(lines):
                entry = parse_line(text, seen)
                async with room:
                    await room.wait_for(partial(has_room, index, isinstance(entry, tuple)))
                stop_if_unwritable()
                if isinstance(entry, dict):  # a line that cannot run: its error, in its place
                    progress.invalid += 1
                    done(index, entry)
                    continue
                model = entry[2].get("model")
                if not told_model and model not in (None, "default"):
                    # A file written for another API names its model: this process serves one.
                    logger.info("the requests name %r: they run on the model served here", model)
                    told_model = True
                task = asyncio.ensure_future(run_one(index, *entry))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            async with room:
                await room.wait_for(lambda: not in_flight or writer.failure is not None)
            stop_if_unwritable()
        except asyncio.CancelledError:
            unfinished = list(in_flight)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
            if writer.failure is None:
                writer.write_held()
            raise
        finally:
            reporter.cancel()
            for task in in_flight:
                task.cancel()
    return progress


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
    """SIGTERM (a scheduler, `kill`, a container stopping) handled as Ctrl-C is: while the requests
    run, their task is cancelled, so that what finished is written; before that, KeyboardInterrupt.
    `exit_code` is what the stop exits with: 143 after SIGTERM, 130 after Ctrl-C."""

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
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

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
    return "interrupted" if stop.received in (None, signal.SIGINT) else "stopped by SIGTERM"


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
                raise KeyboardInterrupt from None  # SIGTERM: ends as Ctrl-C does
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
