"""Two ways to test whether the engine thread's Python slows down beside busy cores (issue 17's
constrained W1 step): pin the engine thread to a core of its own, or keep N other cores busy, as
llguidance's mask threads keep them busy, in an unconstrained run: with processes that only spin
(cores and clock) or that gather at random from 64 MB each (the shared caches and memory too)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator


def pin_calling_thread_apart(core: int) -> dict[str, object]:
    """The calling thread on `core` alone; every other thread of the process (llguidance's, the mask
    worker, the device runtime's) on the remaining cores. Threads made later inherit their maker's."""
    allowed = os.sched_getaffinity(0)
    if core not in allowed or len(allowed) < 2:
        raise ValueError(f"core {core} is not one of this process's {sorted(allowed)}, or it has only one")
    me = threading.get_native_id()
    rest = allowed - {core}
    others = [int(tid) for tid in os.listdir("/proc/self/task") if int(tid) != me]
    for tid in others:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, rest)
    os.sched_setaffinity(me, {core})
    return {"engine_thread_core": core, "other_threads": len(others), "their_cores": len(rest)}


BUSY_KINDS = {
    "spin": "while True: pass",
    "memory": (
        "import numpy as np\n"
        "table = np.random.rand(8 << 20)\n"
        "at = np.random.randint(0, 8 << 20, 1 << 20)\n"
        "while True: table.take(at)"
    ),
}


@contextlib.contextmanager
def busy_processes(count: int, kind: str = "spin") -> Iterator[None]:
    """`count` processes busy for the duration, each its own interpreter (no GIL shared with the caller)."""
    spinners = [subprocess.Popen([sys.executable, "-c", BUSY_KINDS[kind]]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def threads_cpu_seconds() -> Counter[str]:
    """CPU seconds (user + system) each thread of this process has run, summed by thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    totals: Counter[str] = Counter()
    for tid in os.listdir("/proc/self/task"):
        task = f"/proc/self/task/{tid}"
        # A thread that ended meanwhile has no files left.
        with (
            contextlib.suppress(FileNotFoundError),
            open(f"{task}/comm") as comm,
            open(f"{task}/stat") as stat,
        ):
            totals[comm.read().strip()] += stat_cpu_ticks(stat_fields(stat.read())) / tick
    return totals


def stat_fields(stat: str) -> list[str]:
    """The fields of a /proc/<pid>/stat (or task) line after the parenthesised command name, which may
    itself hold spaces and parentheses: the state first, then the parent pid, and so on."""
    return stat[stat.rindex(")") + 2 :].split()


def stat_cpu_ticks(fields: list[str]) -> int:
    """User plus system time, in clock ticks, from stat_fields (its 12th and 13th entries)."""
    return int(fields[11]) + int(fields[12])
