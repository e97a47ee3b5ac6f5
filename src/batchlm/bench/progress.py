"""A cheap progress line on stderr, redrawn by a timer rather than per request."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import TextIO

from batchlm.bench.records import RequestResult

_BAR_WIDTH = 24


class Progress:
    """Counts finished requests; `run()` redraws a status line until cancelled.

    On a terminal the line is redrawn in place every `interval_s`; otherwise (logs, CI) a plain line is
    printed every `log_interval_s` so output stays readable.
    """

    def __init__(
        self,
        total: int | None,
        duration_s: float | None,
        stream: TextIO | None = None,
        interval_s: float = 0.5,
        log_interval_s: float = 10.0,
    ) -> None:
        self.total = total
        self.duration_s = duration_s
        self.done = 0
        self.failed = 0
        self.tokens = 0
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._interval = interval_s if self._tty else log_interval_s
        self._start = time.perf_counter()

    def update(self, result: RequestResult) -> None:
        self.done += 1
        if result.error is not None:
            self.failed += 1
        elif result.usage_completion_tokens is not None:  # output tokens of successful requests
            self.tokens += result.usage_completion_tokens
        else:
            self.tokens += len(result.chunk_times)

    async def run(self) -> None:
        self._start = time.perf_counter()
        try:
            while True:
                await asyncio.sleep(self._interval)
                self._draw(final=False)
        finally:
            self._draw(final=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        if self.total:
            fraction = min(1.0, self.done / self.total)
            head = f"{self.done}/{self.total}"
        elif self.duration_s:
            fraction = min(1.0, elapsed / self.duration_s)
            head = f"{self.done} done"
        else:
            fraction, head = 0.0, f"{self.done} done"
        filled = round(fraction * _BAR_WIDTH)
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        return f"[{bar}] {head}  failed {self.failed}  {elapsed:6.1f}s  {rate:8.1f} tok/s (finished requests)"

    def _draw(self, final: bool) -> None:
        if self._tty:
            # "\x1b[K" clears what a longer previous line left behind.
            self._stream.write("\r" + self.line() + "\x1b[K" + ("\n" if final else ""))
        else:
            self._stream.write(self.line() + "\n")
        self._stream.flush()


@contextlib.asynccontextmanager
async def shown(progress: Progress | None) -> AsyncIterator[None]:
    """Runs the progress redraw task for the duration of the block (no-op for None)."""
    if progress is None:
        yield
        return
    task = asyncio.get_running_loop().create_task(progress.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
