"""`batchlm run-batch`: a file of requests in OpenAI's Batch API format (JSONL: `custom_id`, `method`,
`url`, `body`) run against a model in this process. Each request goes through the same server the API
serves, on a local port, so it is validated, templated and constrained exactly as it would be over
HTTP; the results are written in the Batch API's output format, one line per input line, in input order."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO, cast

from batchlm.backends import BACKEND_CHOICES
from batchlm.flags import add_engine_arguments, dataclass_from_args
from batchlm.logging_setup import LOG_LEVELS, configure_logging

logger = logging.getLogger(__name__)

# The endpoints a batch line may name, as OpenAI's Batch API names them.
BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchlm.reasoning.registry import REASONING_PARSER_CHOICES
    from batchlm.tools.registry import TOOL_CALL_PARSER_CHOICES

    batch = parser.add_argument_group("batch")
    batch.add_argument(
        "-i", "--input-file", required=True, help="the requests, one JSON object a line ('-': standard input)"
    )
    batch.add_argument(
        "-o", "--output-file", required=True, help="where the results go, one a line ('-': standard output)"
    )
    batch.add_argument(
        "--max-concurrency",
        type=int,
        default=256,
        help="requests in flight at once; the engine batches them (default: 256)",
    )
    batch.add_argument(
        "--progress-interval", type=float, default=10.0, help="seconds between progress lines (default: 10)"
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

    total: int
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    # Lines that ran and got an HTTP error, and lines that could not run at all.
    failed: int = 0
    invalid: int = 0
    completion_tokens: int = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return (
            f"{self.done}/{self.total} requests done ({self.failed} failed, {self.invalid} invalid), "
            f"{self.done / elapsed:.1f} requests/s, {self.completion_tokens / elapsed:.0f} output tokens/s"
        )


def result_line(custom_id: str | None, status: int, body: Any) -> dict[str, Any]:
    """A request that ran: its HTTP status and body, as the Batch API writes them."""
    given = body.get("id") if isinstance(body, dict) else None
    request_id = given if isinstance(given, str) else f"req_{uuid.uuid4().hex}"
    response = {"status_code": status, "request_id": request_id, "body": body}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": None,
    }


def error_line(custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    """A line that could not run."""
    error = {"code": code, "message": message}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None, "error": error}


def parse_line(text: str, seen: set[str]) -> tuple[str, str, dict[str, Any]] | dict[str, Any]:
    """(custom_id, url, body) of a valid line, else its error line. `seen` collects the custom ids."""
    try:
        item = json.loads(text)
    except ValueError as error:
        return error_line(None, "invalid_json", f"the line is not JSON: {error}")
    if not isinstance(item, dict):
        return error_line(None, "invalid_request", "a line must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return error_line(None, "invalid_request", "'custom_id' must be a non-empty string")
    if custom_id in seen:
        return error_line(
            custom_id, "duplicate_custom_id", f"'custom_id' {custom_id!r} is used by an earlier line"
        )
    seen.add(custom_id)
    url, body = item.get("url"), item.get("body")
    if item.get("method", "POST") != "POST":
        return error_line(custom_id, "invalid_request", "'method' must be POST")
    if url not in BATCH_URLS:
        return error_line(
            custom_id, "invalid_url", f"'url' must be one of {', '.join(BATCH_URLS)}; got {url!r}"
        )
    if not isinstance(body, dict):
        return error_line(custom_id, "invalid_request", "'body' must be a JSON object")
    if body.get("stream"):
        return error_line(custom_id, "invalid_request", "'stream' is not supported in a batch")
    return custom_id, url, body


class OrderedWriter:
    """Writes result lines in input order as they complete out of order."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._waiting: dict[int, dict[str, Any]] = {}
        # The first line not written yet.
        self.next = 0

    def put(self, index: int, line: dict[str, Any]) -> None:
        self._waiting[index] = line
        while self.next in self._waiting:
            self._out.write(json.dumps(self._waiting.pop(self.next), ensure_ascii=False) + "\n")
            self.next += 1
        self._out.flush()


async def run_lines(
    base_url: str, lines: list[str], out: TextIO, max_concurrency: int, progress_interval: float
) -> BatchProgress:
    """Run every line against the server at `base_url`; results go to `out` in input order."""
    import aiohttp

    progress = BatchProgress(total=len(lines))
    writer = OrderedWriter(out)
    seen: set[str] = set()
    parsed = [parse_line(text, seen) for text in lines]
    # The model is the one this process serves, whatever a line names (a file written for another API).
    renamed = {entry[2].get("model") for entry in parsed if isinstance(entry, tuple)}
    if renamed - {None, "default"}:
        logger.info(
            "the requests name %s: they run on the model served here", sorted(map(str, renamed - {None}))
        )
    # At most max_concurrency requests in flight, started in input order, and never further ahead of
    # the first unwritten line than the window: memory stays bounded however long the file is.
    window = 4 * max_concurrency
    room = asyncio.Condition()
    in_flight: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=max_concurrency)
    timeout = aiohttp.ClientTimeout(total=None)

    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as client:

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

        def has_room(index: int) -> bool:
            return len(in_flight) < max_concurrency and index - writer.next < window

        async def report() -> None:
            while True:
                await asyncio.sleep(progress_interval)
                logger.info("run-batch: %s", progress.line())

        reporter = asyncio.ensure_future(report())
        try:
            for index, entry in enumerate(parsed):
                if isinstance(entry, dict):  # a line that cannot run: its error, in its place
                    progress.invalid += 1
                    done(index, entry)
                    continue
                async with room:
                    await room.wait_for(partial(has_room, index))
                task = asyncio.ensure_future(run_one(index, *entry))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if in_flight:
                await asyncio.gather(*in_flight)
        finally:
            reporter.cancel()
            for task in in_flight:
                task.cancel()
    return progress


@contextmanager
def _opened(path: str, mode: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdin if mode == "r" else sys.stdout
        return
    with open(path, mode, encoding="utf-8") as handle:
        yield cast(TextIO, handle)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if args.max_concurrency < 1:
        logger.error("--max-concurrency must be at least 1, got %d", args.max_concurrency)
        return 2
    try:
        with _opened(args.input_file, "r") as source:
            lines = [line for line in source if line.strip()]
    except OSError as error:
        logger.error("cannot read %s: %s", args.input_file, error)
        return 2
    if not lines:
        logger.error("%s holds no requests", args.input_file)
        return 2
    target = Path(args.output_file).resolve().parent
    if args.output_file != "-" and not (target.is_dir() and os.access(target, os.W_OK)):
        logger.error("cannot write %s: %s is not a writable directory", args.output_file, target)
        return 2
    from batchlm.backends import create_engine
    from batchlm.config import EngineConfig
    from batchlm.server.background import BackgroundServer
    from batchlm.server.state import ServerSettings

    config = dataclass_from_args(EngineConfig, args)
    settings = ServerSettings(
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
    logger.info("run-batch: %d requests from %s", len(lines), args.input_file)
    # Every backend's engine loads in start(), which is not part of the EngineClient interface.
    server = BackgroundServer(engine, settings, start_engine=engine.start)  # type: ignore[attr-defined]
    with server:
        try:
            server.wait_until_ready(timeout_s=3600)
        except (RuntimeError, TimeoutError) as error:  # why is logged where the engine failed
            logger.error("run-batch: %s; no request ran", error)
            return 1
        with _opened(args.output_file, "w") as out:
            progress = asyncio.run(
                run_lines(server.base_url, lines, out, args.max_concurrency, args.progress_interval)
            )
    logger.info("run-batch: %s; results in %s", progress.line(), args.output_file)
    return 0
