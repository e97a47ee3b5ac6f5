"""How many CPU threads torch may use: no more than the CPUs this process is actually allowed to run on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from batchlm.config import positive_int_from_env
from batchlm.cpu_wait_policy import describe_wait_policy

logger = logging.getLogger(__name__)

# Environment variable that fixes the engine's torch thread count (the engine-core process reads it).
THREADS_ENV = "BATCHLM_CORE_THREADS"


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs granted by a cgroup CPU quota (containers started with --cpus), rounded up; None if unlimited.

    cgroup v2 writes "<quota> <period>" (or "max <period>") to cpu.max; v1 splits them over two files.
    """
    try:
        quota_text, period_text = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota_text = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period_text = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota_text in ("max", "-1"):
        return None
    quota, period = int(quota_text), int(period_text)
    return max(1, -(-quota // period)) if quota > 0 and period > 0 else None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, bounded by any cgroup quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(count, limit) if limit is not None else count


def cap_cpu_threads() -> int:
    """Lower torch's intra-op thread count to the available CPUs, never raise it; returns the count.

    torch starts one thread per physical core of the host, which in a CPU-limited container is more
    threads than CPUs: every parallel op then waits for a descheduled thread, several times slower.
    """
    threads = torch.get_num_threads()
    allowed = available_cpus()
    waiting = describe_wait_policy()
    if threads > allowed:
        logger.info(
            "CPU compute threads: %d (%d CPUs available; torch chose %d); %s",
            allowed,
            allowed,
            threads,
            waiting,
        )
        torch.set_num_threads(allowed)
        return allowed
    logger.info("CPU compute threads: %d (%d CPUs available); %s", threads, allowed, waiting)
    return threads


def threads_from_env(environ: dict[str, str] | None = None) -> int | None:
    """The thread count set in BATCHLM_CORE_THREADS, or None; raises ValueError naming a bad value."""
    return positive_int_from_env(THREADS_ENV, environ)
