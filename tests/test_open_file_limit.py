"""`batchlm serve` raises its soft open-file limit to the hard limit, so that hundreds of concurrent
connections are answered where the system's default soft limit (often 1024) is lower than that."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import batchlm.backends as backends
from batchlm.server.open_files import RESERVED_FILES, UNLIMITED_HARD_TARGET, raise_open_file_limit
from fake_engine import free_port, wait_until

LOW_SOFT_LIMIT = 256
# More than LOW_SOFT_LIMIT descriptors' worth of connections open at once.
CONNECTIONS = 320


def expected_limit() -> int:
    """The soft limit raise_open_file_limit reaches in a process started now (read when a test runs,
    not when the module is collected: the limits a test inherits are whatever this process has)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return UNLIMITED_HARD_TARGET if hard == resource.RLIM_INFINITY else hard


needs_room = pytest.mark.skipif(
    expected_limit() < 4 * LOW_SOFT_LIMIT, reason="the hard open-file limit leaves nothing to raise"
)


def with_a_low_soft_limit(*argv: str) -> list[str]:
    """A command that runs `python argv...` under a soft limit of LOW_SOFT_LIMIT open files (set by a
    small exec shim: preexec_fn is unsafe in a process with threads, as pytest's may have)."""
    shim = (
        "import os, resource, sys\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({LOW_SOFT_LIMIT}, hard))\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    return [sys.executable, "-c", shim, *argv]


@needs_room
def test_the_soft_limit_is_raised_to_the_hard_limit() -> None:
    script = (
        "import resource\n"
        "from batchlm.server.open_files import raise_open_file_limit\n"
        "print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    result = subprocess.run(
        with_a_low_soft_limit("-c", script),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.split() == [str(expected_limit())] * 2


@needs_room
@pytest.mark.skipif(not backends.mlx_available(), reason="mlx and mlx-lm are not installed")
def test_loading_the_mlx_backend_keeps_the_raised_limit() -> None:
    """mlx_lm sets the limits to (2048, 4096) when imported; the backend's modules import it without
    letting it lower them (a server would hold fewer connections, and its hard limit would stay cut)."""
    script = (
        "import resource\n"
        "from batchlm.server.open_files import raise_open_file_limit\n"
        "raise_open_file_limit()\n"
        "before = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "import batchlm.backends.mlx.loop, mlx_lm.utils\n"
        "print(*before, *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    result = subprocess.run(
        with_a_low_soft_limit("-c", script), capture_output=True, text=True, timeout=300, check=True
    )
    before, after = result.stdout.split()[:2], result.stdout.split()[2:]
    assert before[0] == str(expected_limit()) and after == before


def test_a_limit_already_at_its_ceiling_is_left_alone() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    if before[0] < expected_limit():
        pytest.skip("this process's soft limit is below its hard limit")
    assert raise_open_file_limit() == before[0]
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


@pytest.fixture
def server_with_a_low_soft_limit(tiny_model_dir: Callable[..., Path]) -> Iterator[int]:
    port = free_port()
    command = with_a_low_soft_limit("-m", "batchlm", "serve", "--model", str(tiny_model_dir("llama")),
                                    "--port", str(port), "--max-model-len", "64", "--no-ui")  # fmt: skip
    process = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return process.poll() is not None  # exited: the assertion below says so

        wait_until(healthy, timeout_s=180, what="the server process to be ready")
        assert process.poll() is None, "the server exited during start-up"
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@needs_room
@pytest.mark.slow
def test_more_connections_than_the_inherited_soft_limit_are_all_answered(
    server_with_a_low_soft_limit: int,
) -> None:
    port = server_with_a_low_soft_limit
    connections = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(CONNECTIONS)]
    try:
        for connection in connections:
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        # Past the server's limit a connection is accepted and closed at once: its reply is empty.
        replies = [connection.recv(64) for connection in connections]
    finally:
        for connection in connections:
            connection.close()
    answered = [reply for reply in replies if reply.startswith(b"HTTP/1.1 200")]
    assert len(answered) == CONNECTIONS, f"{CONNECTIONS - len(answered)} connections got no answer"


def test_the_connection_cap_leaves_files_in_reserve() -> None:
    script = "from batchlm.server.open_files import connection_limit\nprint(connection_limit())\n"
    result = subprocess.run(
        with_a_low_soft_limit("-c", script), capture_output=True, text=True, timeout=120, check=True
    )
    assert int(result.stdout) == LOW_SOFT_LIMIT - RESERVED_FILES
