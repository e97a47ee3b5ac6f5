"""The client self-check: it must see a blocked event loop and busy CPU, and say what they mean."""

from __future__ import annotations

import asyncio
import io
import time

from batchlm.bench.progress import Progress
from batchlm.bench.records import RequestResult, RequestSpec
from batchlm.bench.selfcheck import ClientCheck, LoopMonitor


def test_monitor_sees_a_blocked_loop_and_busy_cpu() -> None:
    async def go() -> ClientCheck:
        monitor = LoopMonitor(interval_s=0.005)
        monitor.start()
        await asyncio.sleep(0.02)
        busy_until = time.perf_counter() + 0.1
        while time.perf_counter() < busy_until:  # hog the loop: no timer can fire meanwhile
            pass
        await asyncio.sleep(0.02)
        return await monitor.stop()

    check = asyncio.run(go())
    assert check.lag_samples >= 2
    assert check.loop_lag_max_s >= 0.05  # the timer due during the busy spell fired at its end
    assert check.cpu_percent > 0


def test_verdicts_name_the_cause() -> None:
    calm = ClientCheck(
        cpu_percent=20,
        cpu_s=1.0,
        loop_lag_p50_s=0.0001,
        loop_lag_p99_s=0.001,
        loop_lag_max_s=0.002,
        lag_samples=9,
    )
    assert not calm.client_bound and calm.verdict().startswith("ok")
    busy = ClientCheck(
        cpu_percent=97, cpu_s=1.0, loop_lag_p50_s=0.0, loop_lag_p99_s=0.0, loop_lag_max_s=0.0, lag_samples=9
    )
    assert busy.client_bound and "97% of a core" in busy.verdict()
    starved = ClientCheck(
        cpu_percent=10,
        cpu_s=1.0,
        loop_lag_p50_s=0.02,
        loop_lag_p99_s=0.05,
        loop_lag_max_s=0.08,
        lag_samples=9,
    )
    assert starved.client_bound and "short of CPU" in starved.verdict()


def test_progress_counts_and_prints_plain_lines_off_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(total=4, duration_s=None, stream=out, log_interval_s=0.01)
    spec = RequestSpec("p", 1)
    progress.update(RequestResult(index=0, spec=spec, chunk_times=[1.0, 2.0]))
    progress.update(RequestResult(index=1, spec=spec, error="HTTP 500"))

    async def show_briefly() -> None:
        task = asyncio.get_running_loop().create_task(progress.run())
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(show_briefly())
    lines = out.getvalue().splitlines()
    assert lines and all("\r" not in line for line in lines)
    assert "2/4" in lines[-1] and "failed 1" in lines[-1] and "[############............]" in lines[-1]
