"""Several API-server processes sharing one engine core (`batchlm serve --api-servers N`): the
automatic count, the shared queue limit and delta cadence, readiness, and the whole server on a real
port (the core's side of it: tests/test_core_loop_front_ends.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

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
    shared_port_unsupported_reason,
)
from batchlm.server.state import ServerSettings
from fake_engine import free_port, wait_until

linux_only = pytest.mark.skipif(
    shared_port_unsupported_reason() is not None, reason="needs SO_REUSEPORT (Linux)"
)


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


# -- the whole server: real processes on one port --------------------------------------------------


def serve_command(model_dir: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batchlm.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--device",
        "cpu",
        *extra,
    ]


class ServeProcess:
    def __init__(self, command: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "BATCHLM_CORE_THREADS": "1"}
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_healthy(self, base: str) -> None:
        def healthy() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited early:\n{self.log}")
            try:
                return httpx.get(f"{base}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout_s=120, what="the server to be ready")
        wait_until(lambda: "front end: ready" in self.log, timeout_s=60, what="every API server to be ready")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self._reader.join(5)
        return code


@pytest.fixture
def two_servers(tiny_model_dir: Callable[..., Path]) -> Iterator[tuple[ServeProcess, str]]:
    port = free_port()
    server = ServeProcess(serve_command(tiny_model_dir(), port, "--api-servers", "2", "--log-level", "DEBUG"))
    base = f"http://127.0.0.1:{port}"
    try:
        server.wait_healthy(base)
        yield server, base
    finally:
        if server.process.poll() is None:
            server.stop()


def complete(base: str, index: int) -> dict[str, Any]:
    # A client per request: a new connection each time, so the kernel spreads them over the processes.
    with httpx.Client(timeout=60) as client:
        body = {"prompt": f"request {index}", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
        response = client.post(f"{base}/v1/completions", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def requests_total(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(
        float(m) for m in re.findall(r'^batchlm_requests_total\{outcome="length"\} (\S+)$', text, re.M)
    )


@linux_only
def test_two_api_servers_share_the_port_the_engine_and_the_metrics(
    two_servers: tuple[ServeProcess, str],
) -> None:
    server, base = two_servers
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: complete(base, i), range(48)))
    assert all(r["usage"]["completion_tokens"] == 4 for r in results)
    # Greedy decoding of the same prompt gives the same text whichever process served it.
    assert len({complete(base, 7)["choices"][0]["text"] for _ in range(6)}) == 1

    def served() -> list[str]:
        return re.findall(r"^.*request cmpl-\w+: length", server.log, re.M)

    # A process may log a request's line just after its response reached the client.
    wait_until(lambda: len(served()) >= 54, timeout_s=60, what="every request's log line")
    by_secondary = [line for line in served() if "[api-server-1]" in line]
    assert len(served()) == 54
    assert 0 < len(by_secondary) < 54, "the kernel should spread 54 connections over both processes"
    # Whichever process answers the scrape (a new connection each time), the totals are the sums.
    assert {requests_total(base) for _ in range(8)} == {54.0}

    def engine_totals_reached_every_process() -> bool:
        # The core's last stats reach each process within a few ms of the last response.
        texts = [httpx.get(f"{base}/metrics").text for _ in range(6)]
        return all(
            re.search(r"^batchlm_generation_tokens_total 216\.0$", text, re.M)
            and re.search(r"^batchlm_requests_in_flight 0\.0$", text, re.M)
            for text in texts
        )

    wait_until(engine_totals_reached_every_process, timeout_s=60, what="the token totals in every process")
    # One stats line writer: only the primary logs the periodic stats.
    assert "[api-server-1] batchlm.server.stats" not in server.log
    # The second process, like the primary, froze its start-up objects out of the cyclic GC.
    assert re.search(r"\[api-server-1\] batchlm\.gc_tuning: \d+ start-up objects frozen", server.log)


@linux_only
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_primary_drains_every_process_and_exits_0(
    two_servers: tuple[ServeProcess, str], signum: int
) -> None:
    server, base = two_servers
    body = {"prompt": "drain", "max_tokens": 40, "ignore_eos": True, "stream": True}
    finished: list[str] = []

    def stream() -> None:
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", f"{base}/v1/completions", json=body) as response,
        ):
            events = [
                line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")
            ]
        assert events[-1] == "[DONE]"
        finished.append(json.loads(events[-2])["choices"][0]["finish_reason"])

    workers = [threading.Thread(target=stream) for _ in range(8)]
    for worker in workers:
        worker.start()
    wait_until(
        lambda: server.log.count("POST /v1/completions") >= 8, timeout_s=30, what="the streams to start"
    )
    assert server.stop(signum) == 0, server.log
    for worker in workers:
        worker.join(30)
    assert finished == ["length"] * 8
    assert "Traceback" not in server.log
    assert "did not stop in time" not in server.log


@linux_only
def test_a_crashed_api_server_leaves_the_others_serving(two_servers: tuple[ServeProcess, str]) -> None:
    server, base = two_servers
    pid = int(re.findall(r"\[api-server-1\] uvicorn\.error: Started server process \[(\d+)\]", server.log)[0])
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: "API server 1 exited unexpectedly" in server.log, timeout_s=60, what="the exit to be noticed"
    )
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: complete(base, i), range(16)))
    assert len(results) == 16
    assert server.stop() == 0, server.log


def test_api_servers_must_be_at_least_one(tiny_model_dir: Callable[..., Path]) -> None:
    result = subprocess.run(
        serve_command(tiny_model_dir(), free_port(), "--api-servers", "0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "batchlm serve: error: argument --api-servers: must be at least 1, got 0" in result.stderr


@linux_only
def test_the_primary_claims_its_port_alone_and_the_others_join_it() -> None:
    with bind_first_shared_port("127.0.0.1", 0) as primary:
        port = primary.getsockname()[1]
        # Another API-server process of the same server joins the port.
        bind_shared_port("127.0.0.1", port).close()
        # A second server's primary finds it in use.
        with pytest.raises(OSError):
            bind_first_shared_port("127.0.0.1", port)


@linux_only
def test_a_second_server_on_the_port_is_refused_before_the_model_loads(
    tiny_model_dir: Callable[..., Path],
) -> None:
    # The port held by an API-server process of another `--api-servers N` server: the kernel would let
    # this one share it and split the connections between two servers.
    with bind_shared_port("127.0.0.1", 0) as other_server:
        port = other_server.getsockname()[1]
        result = subprocess.run(
            serve_command(tiny_model_dir(), port, "--api-servers", "2"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stdout + result.stderr


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


@linux_only
def test_disconnects_in_every_process_abort_their_requests_in_the_engine(
    two_servers: tuple[ServeProcess, str],
) -> None:
    server, base = two_servers
    body = {"prompt": "endless", "max_tokens": 450, "ignore_eos": True, "stream": True}  # 512-token model

    def open_and_drop() -> None:
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", f"{base}/v1/completions", json=body) as response,
        ):
            lines = response.iter_lines()
            while not next(lines).startswith("data: "):
                pass
        # Leaving both blocks closes the connection mid-stream.

    def metric(text: str, name: str) -> float:
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(found.group(1)) if found else -1.0

    def all_aborted(expected: int) -> bool:
        text = httpx.get(f"{base}/metrics", timeout=10).text
        disconnects = re.search(r'^batchlm_requests_total\{outcome="client_disconnect"\} (\S+)$', text, re.M)
        return (
            disconnects is not None
            and float(disconnects.group(1)) == expected
            and metric(text, "batchlm_num_requests_running") == 0
            and metric(text, "batchlm_requests_in_flight") == 0
        )

    def disconnect_lines() -> list[str]:
        return re.findall(r"^.*request cmpl-\w+: client_disconnect", server.log, re.M)

    # The kernel spreads connections over the processes by a hash of the client's port, so a
    # round of 8 lands wholly on one process 1 time in 128: drop rounds until both have served.
    for rounds in range(1, 7):
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: open_and_drop(), range(8)))
        dropped = 8 * rounds
        wait_until(lambda n=dropped: all_aborted(n), timeout_s=30, what="every stream to be aborted")
        # A process may log its line just after the metrics count the disconnect.
        logged = lambda n=dropped: len(disconnect_lines()) == n  # noqa: E731
        wait_until(logged, timeout_s=30, what="every disconnect's log line")
        processes = {"[api-server-1]" in line for line in disconnect_lines()}
        if processes == {True, False}:
            break
    assert processes == {True, False}, "both processes should have aborted dropped streams"


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
