"""Several API-server processes sharing one engine core (`batchlm serve --api-servers N`), piece by
piece: each process's share of the batch and the queue, the automatic count, the delta cadence,
readiness, the port the primary claims, the metrics of every process in one scrape, and the pool's
watch over its processes (the whole server on a real port: tests/test_api_servers_live.py; the
core's side of it: tests/test_core_loop_front_ends.py)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from api_servers_harness import linux_only
from batchlm.config import EngineConfig
from batchlm.core.facts import EngineStats
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.engine.client import QueueFullError
from batchlm.engine.output_collector import RequestOutputCollector
from batchlm.server.api_servers import (
    FORCE_EXIT_SIGNAL,
    ApiServerPool,
    _Member,
    automatic_api_servers,
    bind_first_shared_port,
    bind_shared_port,
)
from batchlm.server.state import ServerSettings


def test_each_process_holds_its_share_of_the_batch_and_the_queue() -> None:
    config = EngineConfig(model="unused", device="cpu", max_num_seqs=32)

    def front_end(max_queue: int | None, front_ends: int) -> AsyncLLMEngine:
        return AsyncLLMEngine(config, multiprocess=False, max_queue=max_queue, front_ends=front_ends)

    assert front_end(1024, 1).most_requests_at_once() == 32 + 1024
    # Together the processes hold the batch plus --max-queue, not the batch each.
    assert front_end(1024, 4).most_requests_at_once() == 8 + 256
    assert front_end(10, 4).most_requests_at_once() == 8 + 3
    # --max-queue 0: no request waits, whichever process takes it.
    assert front_end(0, 2).most_requests_at_once() == 16
    assert front_end(None, 4).most_requests_at_once() is None


def test_a_process_refuses_past_its_share_of_the_batch_and_the_queue() -> None:
    config = EngineConfig(model="unused", device="cpu", max_num_seqs=4)
    engine = AsyncLLMEngine(config, multiprocess=False, max_queue=0, front_ends=2)
    # The requests this process holds: its half of the batch.
    engine._collectors = {f"request-{i}": RequestOutputCollector() for i in range(2)}
    with pytest.raises(QueueFullError, match=r"share of --max-queue: 0\)"):
        engine._check_queue_room()
    engine._collectors.popitem()
    engine._check_queue_room()


@linux_only
def test_automatic_count_is_two_on_a_gpu_with_cpus_to_spare_and_one_otherwise() -> None:
    assert automatic_api_servers("cuda", "torch", cpus=16) == 2
    assert automatic_api_servers("cuda:1", "torch", cpus=8) == 2
    assert automatic_api_servers("cuda", "torch", cpus=4) == 1
    # The CPU engine needs the cores itself; MLX has no shared core to attach to.
    assert automatic_api_servers("cpu", "torch", cpus=64) == 1
    assert automatic_api_servers("cuda", "mlx", cpus=64) == 1
    gpu_driver = Path("/dev/nvidiactl").exists()
    assert automatic_api_servers("auto", "torch", cpus=16) == (2 if gpu_driver else 1)


def test_delta_cadence_counts_the_streams_of_every_front_end() -> None:
    # Two API servers with 128 streams each must batch deltas like one server with 256 streams, or
    # a client reading all 256 would be sent twice as many events.
    from batchlm.config import EngineConfig
    from batchlm.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine(EngineConfig())
    engine._collectors = dict.fromkeys(map(str, range(128)))  # type: ignore[arg-type]
    assert engine._open_streams() == 128
    engine._engine_stats = EngineStats(num_running=256)
    assert engine._open_streams() == 256
    engine._engine_stats = EngineStats(num_running=3)
    assert engine._open_streams() == 128


def test_health_says_loading_until_every_api_server_serves() -> None:
    from batchlm.server.background import BackgroundServer
    from fake_engine import FakeEngine

    with BackgroundServer(FakeEngine()) as server:
        server.state.starting_api_servers = True
        health = httpx.get(f"{server.base_url}/health")
        assert (health.status_code, health.json()) == (503, {"status": "loading"})
        # Requests are served meanwhile: only the readiness signal waits for the others.
        body = {"model": "fake-model", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{server.base_url}/v1/completions", json=body).status_code == 200
        server.state.starting_api_servers = False
        assert httpx.get(f"{server.base_url}/health").status_code == 200


@linux_only
def test_the_primary_claims_its_port_alone_and_the_others_join_it() -> None:
    with bind_first_shared_port("127.0.0.1", 0) as primary:
        port = primary.getsockname()[1]
        # Another API-server process of the same server joins the port.
        bind_shared_port("127.0.0.1", port).close()
        # A second server's primary finds it in use.
        with pytest.raises(OSError):
            bind_first_shared_port("127.0.0.1", port)


def test_a_scrape_skips_the_metrics_file_a_starting_process_is_creating(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from batchlm.server.metrics import SharedMetricsCollector

    # Another process's counter, written in prometheus_client's multiprocess mode.
    writer = (
        "import sys; from batchlm.server.metrics import share_metrics_between_processes;"
        "share_metrics_between_processes(sys.argv[1]);"
        "from prometheus_client import CollectorRegistry, Counter;"
        "Counter('batchlm_requests', 'x', ['outcome'], registry=CollectorRegistry()).labels(outcome='stop').inc(3)"
    )
    subprocess.run([sys.executable, "-c", writer, str(tmp_path)], check=True, timeout=60)
    # A process that has just opened its file and not yet sized it.
    (tmp_path / "counter_999999.db").touch()
    registry = CollectorRegistry()
    registry.register(SharedMetricsCollector(str(tmp_path)))
    text = generate_latest(registry).decode()
    assert re.search(r'^batchlm_requests_total\{outcome="stop"\} 3\.0$', text, re.M), text


# A process serving /metrics in multiprocess mode whose engine snapshot counts argv[2] generated
# tokens; it prints what it answers.
SCRAPE_WITH_SNAPSHOT = """
import sys
from batchlm.server.metrics import share_metrics_between_processes
share_metrics_between_processes(sys.argv[1])
from batchlm.core.facts import EngineStats
from batchlm.server.metrics import ServerMetrics

class Engine:
    is_ready, is_dead = True, False

    def stats(self):
        return EngineStats(generation_tokens_total=int(sys.argv[2]), prompt_tokens_total=7)

print(ServerMetrics(Engine()).render().decode())
"""


def test_engine_counters_never_go_down_between_scrapes_of_different_processes(tmp_path: Path) -> None:
    """Each process's snapshot of the core lags by its own few milliseconds: a scrape answered by one
    that lags more must not show a counter lower than the last scrape did (Prometheus: a reset)."""

    def scrape(generated: int) -> str:
        command = [sys.executable, "-c", SCRAPE_WITH_SNAPSHOT, str(tmp_path), str(generated)]
        return subprocess.run(command, check=True, timeout=60, capture_output=True, text=True).stdout

    assert re.search(r"^batchlm_generation_tokens_total 100\.0$", scrape(100), re.M)
    lagging = scrape(90)
    assert re.search(r"^batchlm_generation_tokens_total 100\.0$", lagging, re.M), lagging
    assert re.search(r"^batchlm_prompt_tokens_total 7\.0$", lagging, re.M), lagging
    assert "counter_marks" not in lagging
    assert re.search(r"^batchlm_generation_tokens_total 120\.0$", scrape(120), re.M)


class _Child:
    """A process as ApiServerPool sees one of its API servers: the pool signals it by pid."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.pid = process.pid
        self._process = process

    def is_alive(self) -> bool:
        return self._process.poll() is None


class _Exited:
    """An API-server process that has exited with `exitcode`."""

    pid = None

    def __init__(self, exitcode: int) -> None:
        self.exitcode = exitcode

    def is_alive(self) -> bool:
        return False


@pytest.mark.parametrize(("engine_stopped", "exitcode"), [(False, -9), (True, 0)])
def test_an_api_server_exit_is_an_error_only_while_the_engine_serves(
    engine_stopped: bool, exitcode: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the engine has stopped every API server exits by design: no error that says the others
    keep serving."""
    monkeypatch.setattr("batchlm.server.api_servers.MONITOR_INTERVAL_S", 0.0)
    pool = ApiServerPool(ServerSettings(), EngineConfig(model="unused"))
    status, _ = multiprocessing.Pipe(duplex=False)
    pool._members.append(_Member(1, _Exited(exitcode), status))  # type: ignore[arg-type]

    async def watch_until_seen() -> None:
        monitor = asyncio.ensure_future(pool.monitor(lambda: engine_stopped))
        while 1 not in pool._reported_exit:
            await asyncio.sleep(0)
        monitor.cancel()

    with caplog.at_level(logging.INFO, logger="batchlm.server.api_servers"):
        asyncio.run(watch_until_seen())
    [record] = [r for r in caplog.records if r.name == "batchlm.server.api_servers"]
    if engine_stopped:
        assert (
            record.levelno == logging.INFO
            and record.getMessage() == "API server 1 exited: the engine stopped"
        )
    else:
        assert record.levelno == logging.ERROR and "exited unexpectedly (exit code -9)" in record.getMessage()


@linux_only
def test_a_forced_stop_of_the_primary_reaches_every_api_server() -> None:
    # A second Ctrl-C aborts the streams of every process at once, not only the primary's (the
    # others would drain theirs for the rest of the drain period, holding the exit).
    waits_for_force = (
        "import signal, sys\n"
        f"signal.signal({int(FORCE_EXIT_SIGNAL)}, lambda *_: sys.exit(7))\n"
        "print('ready', flush=True)\n"
        "signal.pause()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", waits_for_force], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        pool = ApiServerPool(ServerSettings(), EngineConfig(model="unused"))
        status, _ = multiprocessing.Pipe(duplex=False)
        pool._members.append(_Member(1, _Child(child), status))  # type: ignore[arg-type]
        pool.force_stop()
        assert child.wait(timeout=60) == 7
    finally:
        if child.poll() is None:
            child.kill()
