"""One load level sent from several client processes (`batchlm bench --client-processes N`).

One Python event loop reads SSE at roughly 70,000-125,000 events/s of CPU on a free core (BENCHMARKS.md,
the self-check), so a fast server streaming to hundreds of connections can make the client the
bottleneck. Here each process gets every N-th request of the workload and 1/N of the load (users,
arrival rate, in-flight cap), runs its own session and event loop, and sends its results back. All
start at one agreed moment of the shared clock (perf_counter is CLOCK_MONOTONIC on Linux, the same
in every process), so timestamps from different processes are comparable and the results are
merged into one outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import multiprocessing
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import aiohttp

from batchlm.bench.loadgen import LoadConfig, LoadGenerator, LoadOutcome
from batchlm.bench.openai_format import EndpointConfig
from batchlm.bench.records import RequestResult, RequestSpec
from batchlm.bench.selfcheck import ClientCheck, LoopMonitor

# Margin between the last process saying it is ready and the common start.
START_MARGIN_S = 0.05
# How long a process may take to import and open its session before the run is abandoned.
READY_TIMEOUT_S = 120.0


# What a client process sends back: its task index, the process count, its outcome and self-check.
WorkerReply = tuple[int, int, LoadOutcome, ClientCheck]


class ClientWorkerError(RuntimeError):
    """A client process failed or did not start; the message says which and why."""


@dataclass(frozen=True)
class WorkerTask:
    """One client process's share of a load level."""

    index: int
    count: int
    endpoint: EndpointConfig
    specs: list[RequestSpec]
    load: LoadConfig
    request_timeout_s: float
    # GET to open the process's connections before the start (None: not done).
    warm_url: str | None = None


def share_of(load: LoadConfig, index: int, count: int) -> LoadConfig | None:
    """Process `index`'s part of `load` split `count` ways; None when it gets no users at all.
    Closed loop: the users are dealt out. Open loop: each process gets 1/count of the rate (merged
    independent Poisson streams are the Poisson stream of the whole rate) and of the in-flight cap,
    with its own arrival seed."""

    def dealt(total: int) -> int:
        return total // count + (1 if index < total % count else 0)

    seed = load.seed * 1_000_003 + index
    if load.concurrency is not None:
        users = dealt(load.concurrency)
        return dataclasses.replace(load, concurrency=users, seed=seed) if users else None
    assert load.request_rate is not None
    rate = load.request_rate if math.isinf(load.request_rate) else load.request_rate / count
    cap = None if load.max_concurrency is None else dealt(load.max_concurrency)
    if cap == 0:
        return None
    return dataclasses.replace(load, request_rate=rate, max_concurrency=cap, seed=seed)


def processes_for(load: LoadConfig, count: int) -> int:
    """How many of `count` client processes a level uses: no more than it has requests in flight (its
    users, or its in-flight cap), since a process with no share could send none of its requests."""
    limit = load.in_flight_limit
    return count if limit is None else max(1, min(count, limit))


def run_in_processes(
    endpoint: EndpointConfig,
    specs: list[RequestSpec],
    load: LoadConfig,
    count: int,
    request_timeout_s: float,
    warm_url: str | None = None,
) -> tuple[LoadOutcome, ClientCheck]:
    """Run one load level from up to `count` processes (blocking); the merged outcome and self-check."""
    count = processes_for(load, count)
    tasks = []
    for index in range(count):
        share = share_of(load, index, count)
        part = specs[index::count]
        if share is not None and part:
            tasks.append(WorkerTask(index, count, endpoint, part, share, request_timeout_s, warm_url))
    context = multiprocessing.get_context("spawn")
    started: list[tuple[WorkerTask, BaseProcess, Connection]] = []
    try:
        for task in tasks:
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=worker_main,
                args=(task, child_end),
                name=f"batchlm-bench-client-{task.index}",
                daemon=True,
            )
            process.start()
            child_end.close()
            started.append((task, process, parent_end))
        for member in started:
            _expect(*member, "ready", READY_TIMEOUT_S)
        start_at = time.perf_counter() + START_MARGIN_S
        for _, _, conn in started:
            conn.send(("start", start_at))
        replies = [_expect(*member, "done") for member in started]
    finally:
        for _, worker, conn in started:
            with contextlib.suppress(OSError):
                conn.close()
            worker.join(5)
            if worker.is_alive():
                worker.kill()
    return merge(replies)


def _expect(
    task: WorkerTask, process: BaseProcess, conn: Connection, kind: str, timeout_s: float = math.inf
) -> Any:
    """The payload of the next message, which must be `kind` (within timeout_s); raises
    ClientWorkerError otherwise."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.2):
        if not process.is_alive():
            raise ClientWorkerError(f"client process {task.index} exited with code {process.exitcode}")
        if time.monotonic() > deadline:
            raise ClientWorkerError(f"client process {task.index} sent no {kind!r} within {timeout_s:.0f} s")
    try:
        got, payload = conn.recv()
    except (EOFError, OSError):
        raise ClientWorkerError(f"client process {task.index} exited with code {process.exitcode}") from None
    if got == "error":
        raise ClientWorkerError(f"client process {task.index} failed: {payload}")
    if got != kind:
        raise ClientWorkerError(f"client process {task.index} sent {got!r} instead of {kind!r}")
    return payload


def merge(replies: list[WorkerReply]) -> tuple[LoadOutcome, ClientCheck]:
    """One outcome from every process's (task index, count, outcome, check): results re-indexed into
    the workload's numbering (process i's j-th request was the workload's i + j * count), the run
    from the earliest start to the latest end; for the self-check the busiest process counts (each
    has one event loop), CPU seconds add up."""
    results: list[RequestResult] = []
    starts: list[float] = []
    ends: list[float] = []
    delays: list[float] = []
    warm = 0
    checks: list[ClientCheck] = []
    for reply in replies:
        index, count, outcome, check = reply
        for result in outcome.results:
            result.index = index + result.index * count
            results.append(result)
        starts.append(outcome.run_start)
        ends.append(outcome.run_start + outcome.duration_s)
        delays.append(outcome.max_dispatch_delay_s)
        warm += outcome.warm_connections
        checks.append(check)
    if not checks:
        raise ClientWorkerError("no client process had any work")
    results.sort(key=lambda result: result.end)
    run_start = min(starts)
    outcome = LoadOutcome(results, run_start, max(ends) - run_start, max(delays), warm)
    check = ClientCheck(
        cpu_percent=max(c.cpu_percent for c in checks),
        cpu_s=sum(c.cpu_s for c in checks),
        loop_lag_p50_s=max(c.loop_lag_p50_s for c in checks),
        loop_lag_p99_s=max(c.loop_lag_p99_s for c in checks),
        loop_lag_max_s=max(c.loop_lag_max_s for c in checks),
        lag_samples=sum(c.lag_samples for c in checks),
        max_dispatch_delay_s=outcome.max_dispatch_delay_s,
    )
    return outcome, check


def worker_main(task: WorkerTask, conn: Connection) -> None:
    """Entry point of a client process: say ready, wait for the start time, run, send the results."""
    try:
        asyncio.run(_run(task, conn))
    except BaseException:  # reported to the parent, which names this process
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc(limit=3)))


async def _run(task: WorkerTask, conn: Connection) -> None:
    limit = task.load.in_flight_limit or 0
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=task.request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        generator = LoadGenerator(session, task.endpoint, task.specs, warm_url=task.warm_url)
        await generator.open_connections(task.load)
        conn.send(("ready", None))
        kind, start_at = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        if kind != "start":
            return
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        monitor = LoopMonitor()
        monitor.start()
        outcome = await generator.run(task.load)
        check = await monitor.stop(outcome.max_dispatch_delay_s)
    conn.send(("done", (task.index, task.count, outcome, check)))
