"""Load generation: closed-loop simulated users, or open-loop Poisson/gamma arrivals with a concurrency cap."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import aiohttp

from batchlm.bench.client import send_request
from batchlm.bench.openai_format import EndpointConfig
from batchlm.bench.progress import Progress
from batchlm.bench.records import RequestResult, RequestSpec

# Connections opened ahead of a level that has no in-flight limit (open loop without
# --max-concurrency), at most; with a limit, that many (never more than the level's requests).
MAX_WARM_CONNECTIONS = 256


@dataclass(frozen=True)
class LoadConfig:
    """How requests are paced; exactly one of `concurrency` (closed loop) and `request_rate` (open loop)."""

    # Closed loop: simulated users, each sending its next request when the previous one finished
    # (after the request's think time).
    concurrency: int | None = None
    # Open loop: mean arrivals per second; math.inf sends everything at once.
    request_rate: float | None = None
    # Gamma shape of inter-arrival times: 1 = Poisson, <1 burstier, >1 more regular, inf = constant.
    burstiness: float = 1.0
    # Open loop: most requests in flight; arrivals beyond it wait for a free slot.
    max_concurrency: int | None = None
    # Stop starting new requests after this many seconds (the workload is cycled); None = send it all.
    duration_s: float | None = None
    # Seeds the arrival schedule.
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("set exactly one of concurrency (closed loop) and request_rate (open loop)")

    @property
    def in_flight_limit(self) -> int | None:
        """Most requests in flight at once (sizes the connection pool); None = unbounded."""
        return self.concurrency if self.concurrency is not None else self.max_concurrency


@dataclass
class LoadOutcome:
    """Results of one load run, in completion order."""

    results: list[RequestResult]
    run_start: float
    duration_s: float
    # Open loop without a cap: the latest a request was sent after its scheduled arrival.
    max_dispatch_delay_s: float
    # Connections opened before the level started (LoadGenerator.open_connections).
    warm_connections: int = 0


def arrival_gaps(request_rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Endless inter-arrival times with mean 1/request_rate; gamma(shape=burstiness) distributed."""
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("request_rate and burstiness must be positive")
    while True:
        if math.isinf(request_rate):
            yield 0.0
        elif math.isinf(burstiness):
            yield 1.0 / request_rate
        else:
            yield rng.gammavariate(burstiness, 1.0 / (request_rate * burstiness))


class LoadGenerator:
    """Sends a workload under one LoadConfig over a shared session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: EndpointConfig,
        specs: list[RequestSpec],
        progress: Progress | None = None,
        warm_url: str | None = None,
    ) -> None:
        if not specs:
            raise ValueError("the workload has no requests")
        self._session = session
        self._endpoint = endpoint
        self._specs = specs
        self._progress = progress
        # GET before a level to open its connections (the server's /v1/models); None: not done.
        self._warm_url = warm_url
        self._warm_connections = 0
        self._results: list[RequestResult] = []

    async def open_connections(self, load: LoadConfig) -> int:
        """Opens the connections the level can use at once before it starts: that many concurrent GETs
        of the warm URL, whose kept-alive connections the pool then hands to the level's requests.
        Without them, a burst of N requests first waits for N TCP connects made one after another on
        this event loop, so the client, not the server, paces the burst's arrival. Returns how many
        answers kept their connection open (none from a server without keep-alive); failures are left
        for the level itself to report."""
        if self._warm_url is None:
            return 0
        limit = load.in_flight_limit
        count = min(len(self._specs), MAX_WARM_CONNECTIONS if limit is None else limit)
        answered = await asyncio.gather(*(self._touch(self._warm_url) for _ in range(count)))
        self._warm_connections = sum(answered)
        return self._warm_connections

    async def _touch(self, url: str) -> bool:
        """GET `url`; True when the answer leaves its connection open for the pool."""
        try:
            async with self._session.get(url, headers=self._endpoint.headers) as response:
                await response.read()
                closes = response.headers.get("Connection", "").lower() == "close"
                version = response.version
                return version is not None and version >= aiohttp.HttpVersion11 and not closes
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def run(self, load: LoadConfig) -> LoadOutcome:
        self._results = []
        run_start = perf_counter()
        deadline = run_start + load.duration_s if load.duration_s is not None else None
        if load.concurrency is not None:
            counter = itertools.count()
            users = [self._user(counter, deadline) for _ in range(load.concurrency)]
            await asyncio.gather(*users)
            dispatch_delay = 0.0
        else:
            dispatch_delay = await self._open_loop(load, run_start, deadline)
        return LoadOutcome(
            self._results, run_start, perf_counter() - run_start, dispatch_delay, self._warm_connections
        )

    async def _user(self, counter: Iterator[int], deadline: float | None) -> None:
        """A simulated user: think, send, wait for the whole answer, repeat."""
        while True:
            index = next(counter)
            if deadline is None and index >= len(self._specs):
                return
            spec = self._specs[index % len(self._specs)]
            if spec.think_time > 0:
                await asyncio.sleep(spec.think_time)
            now = perf_counter()
            if deadline is not None and now >= deadline:
                return
            await self._send(index, spec, now)

    async def _open_loop(self, load: LoadConfig, run_start: float, deadline: float | None) -> float:
        assert load.request_rate is not None
        gaps = arrival_gaps(load.request_rate, load.burstiness, random.Random(f"{load.seed}:arrivals"))
        limit: Any = (
            asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else contextlib.nullcontext()
        )
        tasks: list[asyncio.Task[float]] = []
        due = run_start
        for index in itertools.count():
            if deadline is None and index >= len(self._specs):
                break
            if index > 0:
                # The first request goes out at the start (as vLLM's does); a gap before it would be
                # idle time counted in the duration, which is "first request sent to last finished".
                due += next(gaps)
            if deadline is not None and due >= deadline:
                break
            wait = due - perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            spec = self._specs[index % len(self._specs)]
            tasks.append(asyncio.create_task(self._send_limited(limit, index, spec, due)))
        delays = await asyncio.gather(*tasks)
        return 0.0 if load.max_concurrency else max(delays, default=0.0)

    async def _send_limited(self, limit: Any, index: int, spec: RequestSpec, due: float) -> float:
        async with limit:
            result = await self._send(index, spec, due)
        return max(0.0, result.start - due)

    async def _send(self, index: int, spec: RequestSpec, scheduled: float) -> RequestResult:
        result = RequestResult(index=index, spec=spec, scheduled=scheduled)
        await send_request(self._session, self._endpoint, result)
        self._results.append(result)
        if self._progress is not None:
            self._progress.update(result)
        return result
