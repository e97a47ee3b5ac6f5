"""The lines of a Batch API file run against an OpenAI-compatible server over HTTP (`batchlm run-batch`
serves its own on a local port): a bounded number in flight, the file read only as far ahead as the
results are written, in input order, and the counts for its progress lines."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Sized
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Any

from batchlm.batch_file import OrderedWriter, OutputWriteError, error_line, parse_line, result_line

# The command's logger: the progress lines read as the rest of run-batch's output.
logger = logging.getLogger("batchlm.run_batch")


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
                        request_id = response.headers.get("X-Request-Id")
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
                done(index, result_line(custom_id, status, answer, request_id))
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
