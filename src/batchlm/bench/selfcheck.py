"""Client self-check: event-loop lag and client CPU, to tell when the numbers are client-bound."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from batchlm.bench.stats import percentile

# Above these the client, not the server, may be what limits the measured numbers.
CPU_BUSY_PERCENT = 85.0
LAG_P99_LIMIT_S = 0.010


@dataclass(frozen=True)
class ClientCheck:
    """How loaded the benchmark client itself was during a run."""

    # Client process CPU time over wall time, in % of one core (the event loop uses one core).
    cpu_percent: float
    # Client process CPU seconds used during the run.
    cpu_s: float
    # Event-loop lag: how late a timer that should fire every `interval` actually fired.
    loop_lag_p50_s: float
    loop_lag_p99_s: float
    loop_lag_max_s: float
    # Timer samples taken.
    lag_samples: int
    # Open loop only: how late requests were sent after their scheduled arrival (max, seconds),
    # when no --max-concurrency cap held them back; 0 otherwise.
    max_dispatch_delay_s: float = 0.0

    @property
    def client_bound(self) -> bool:
        """True when the client was busy or laggy enough to distort latencies or throughput."""
        return self.cpu_percent >= CPU_BUSY_PERCENT or self.loop_lag_p99_s >= LAG_P99_LIMIT_S

    def verdict(self) -> str:
        if self.cpu_percent >= CPU_BUSY_PERCENT:
            return (
                f"WARNING: client-bound: the client used {self.cpu_percent:.0f}% of a core; throughput and "
                "latencies may be limited by the client, not the server"
            )
        if self.loop_lag_p99_s >= LAG_P99_LIMIT_S:
            return (
                f"WARNING: event-loop lag p99 {self.loop_lag_p99_s * 1e3:.1f} ms with the client at "
                f"{self.cpu_percent:.0f}% CPU: the machine is short of CPU (other processes?); "
                "timestamps may be late by that much"
            )
        return "ok: the client had headroom"


class LoopMonitor:
    """Samples event-loop lag with a periodic timer and measures process CPU between start and stop."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self._interval = interval_s
        self._lags: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._cpu_start = 0.0
        self._wall_start = 0.0

    def start(self) -> None:
        self._cpu_start = time.process_time()
        self._wall_start = time.perf_counter()
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def stop(self, max_dispatch_delay_s: float = 0.0) -> ClientCheck:
        cpu = time.process_time() - self._cpu_start
        wall = time.perf_counter() - self._wall_start
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        ordered = sorted(self._lags) or [0.0]
        return ClientCheck(
            cpu_percent=100.0 * cpu / wall if wall > 0 else 0.0,
            cpu_s=cpu,
            loop_lag_p50_s=percentile(ordered, 50.0),
            loop_lag_p99_s=percentile(ordered, 99.0),
            loop_lag_max_s=ordered[-1],
            lag_samples=len(self._lags),
            max_dispatch_delay_s=max_dispatch_delay_s,
        )

    async def _sample(self) -> None:
        while True:
            due = time.perf_counter() + self._interval
            await asyncio.sleep(self._interval)
            self._lags.append(max(0.0, time.perf_counter() - due))
