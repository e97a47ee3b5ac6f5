"""Start-up timing for the INFO log: one line per phase, so users see where time-to-ready goes."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

# Every phase line starts with this, so `grep startup:` pulls the whole breakdown out of a log.
PREFIX = "startup:"


def process_uptime_s() -> float | None:
    """Seconds since this process was created (interpreter start and imports included), from Linux's
    /proc; None where /proc is unavailable (macOS) or unreadable."""
    try:
        with open("/proc/self/stat") as stat_file:
            # Field 22 (1-based) is the start time in clock ticks after boot; the name field (2)
            # may hold spaces, so count from the closing parenthesis.
            fields = stat_file.read().rpartition(")")[2].split()
        start_ticks = int(fields[19])
        with open("/proc/uptime") as uptime_file:
            boot_uptime_s = float(uptime_file.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return boot_uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")


def log_phase(logger: logging.Logger, name: str, seconds: float, detail: str = "") -> None:
    """One INFO line: `startup: <name> <seconds> s [(detail)]`."""
    suffix = f" ({detail})" if detail else ""
    logger.info("%s %s %.2f s%s", PREFIX, name, seconds, suffix)


def log_uptime(logger: logging.Logger, what: str) -> None:
    """`startup: <what> <seconds since the process started> s after process start` (skipped without /proc)."""
    uptime = process_uptime_s()
    if uptime is not None:
        logger.info("%s %s %.2f s after process start", PREFIX, what, uptime)


@contextmanager
def timed_phase(logger: logging.Logger, name: str) -> Iterator[None]:
    """Logs the wall time of the block as one phase line when it completes (not when it raises:
    a failed start is reported by its error, and a partial time would mislead)."""
    started = time.perf_counter()
    yield
    log_phase(logger, name, time.perf_counter() - started)
