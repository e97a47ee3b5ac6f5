"""The whole server with several API-server processes on one real port (`batchlm serve --api-servers
N`): the port, the engine and the metrics shared, a signal's drain, a crashed process, disconnects in
every process, and the refusals before the model loads (the pieces:
tests/test_api_servers_coordination.py)."""

from __future__ import annotations

import json
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

from api_servers_harness import linux_only
from batchlm.server.api_servers import (
    bind_shared_port,
)
from fake_engine import free_port, wait_until


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
