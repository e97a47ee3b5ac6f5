"""Stop signals as users send them: SIGTERM and SIGINT arriving together (a forced exit, whatever order
the kernel reports them in), the hangup of a closed terminal (a drain, like SIGTERM), and either sent
to every process of the server at once (a drain, with no process or traceback left behind)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from batchlm.stop_signals import stop_signals
from fake_engine import free_port, wait_until
from test_server_drain import STREAM, data_lines, fake_server_process

posix_only = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")


@posix_only
def test_sighup_stops_the_server_unless_it_is_ignored() -> None:
    assert signal.SIGHUP in stop_signals()
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        assert stop_signals() == (signal.SIGINT, signal.SIGTERM)
    finally:
        signal.signal(signal.SIGHUP, previous)


@posix_only
def test_sigterm_and_sigint_arriving_together_force_the_exit() -> None:
    # Both pending at once (the process stopped meanwhile, as on a busy machine between two `kill`s),
    # they are handled lowest number first, SIGINT then SIGTERM: that must not read as one drain,
    # which here would last the whole drain period.
    with fake_server_process(0.5, "--shutdown-timeout", "3600") as (process, base):
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=STREAM, timeout=120) as response:
            lines = response.iter_lines()
            data_lines(lines, count=2)
            process.send_signal(signal.SIGSTOP)
            process.send_signal(signal.SIGTERM)
            process.send_signal(signal.SIGINT)
            process.send_signal(signal.SIGCONT)
            try:
                output, _ = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                raise AssertionError("SIGTERM with SIGINT did not force the exit: still draining") from None
            rest = data_lines(lines)
        assert process.returncode == 0, output
        assert json.loads(rest[-2])["error"]["code"] == "aborted"
        assert "a second signal forced the exit" in output, output
        assert "Traceback" not in output, output


@posix_only
def test_sighup_drains_in_flight_streams_and_exits_0() -> None:
    with fake_server_process(0.5) as (process, base):
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=STREAM, timeout=120) as response:
            lines = response.iter_lines()
            data_lines(lines, count=2)
            process.send_signal(signal.SIGHUP)
            wait_until(lambda: _draining(base, process), what="the drain to begin")
            process.send_signal(signal.SIGUSR1)  # the fake engine's remaining tokens come at once
            rest = data_lines(lines)
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output


def _draining(base: str, process: subprocess.Popen[str]) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"the server exited (code {process.returncode}) instead of draining")
    try:
        return httpx.get(f"{base}/health", timeout=30).status_code == 503
    except httpx.TransportError:
        return False


def _group_members(pgid: int) -> list[str]:
    """`ps` rows of the live (not zombie) processes of a process group."""
    rows = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True).stdout
    return [
        row
        for row in rows.splitlines()
        if len(fields := row.split(None, 3)) >= 3 and fields[1] == str(pgid) and not fields[2].startswith("Z")
    ]


@posix_only
@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGHUP", "SIGTERM"])
def test_a_signal_to_the_whole_group_drains_every_process_of_the_server(
    tiny_model_dir: Callable[..., Path], signame: str
) -> None:
    # A closed terminal's SIGHUP, or a SIGTERM to the group (`kill -- -PGID`; systemd stopping the
    # unit sends it to every process), reaches the primary, the other API server, the engine core,
    # the tensor-parallel workers and multiprocessing's resource tracker at once: the primary drains,
    # the others wait for it, and everything exits without a traceback.
    signum = getattr(signal, signame)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "batchlm.cli",
        "serve",
        *("--model", str(tiny_model_dir()), "--port", str(port), "--device", "cpu"),
        *("--api-servers", "2", "--tensor-parallel-size", "2", "--log-level", "DEBUG"),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BATCHLM_CORE_THREADS": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    finished: list[str] = []

    def stream() -> None:
        # Long enough to be in flight when the signal comes, most likely; they finish either way.
        body = {"prompt": "hangup", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with (
            httpx.Client(timeout=120) as client,
            client.stream("POST", f"{base}/v1/completions", json=body) as r,
        ):
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        finished.append(
            json.loads(events[-2])["choices"][0]["finish_reason"] if events[-1] == "[DONE]" else ""
        )

    try:
        wait_until(lambda: "front end: ready" in "".join(lines), timeout_s=300, what="the server to be ready")
        streams = [threading.Thread(target=stream) for _ in range(4)]
        for each in streams:
            each.start()
        wait_until(
            lambda: "".join(lines).count("POST /v1/completions") >= 4, timeout_s=60, what="the streams"
        )
        os.killpg(process.pid, signum)
        try:
            code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit after {signame}") from None
        for each in streams:
            each.join(60)
        wait_until(lambda: not _group_members(process.pid), timeout_s=60, what="every process to exit")
        reader.join(10)
        log = "".join(lines)
        assert code == 0, log
        assert finished == ["length"] * 4, log
        assert "Traceback" not in log, log
        assert "resource_tracker" not in log, log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _children(pid: int) -> list[int]:
    rows = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    return [int(fields[0]) for row in rows.splitlines() if (fields := row.split())[1:] == [str(pid)]]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited process its parent, here perhaps init, has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_engine_core_exits_when_its_front_end_is_killed_while_it_starts(
    tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    # The CPU kernels' compiler never finishes while the core lives, as a large model's load holds
    # the core for minutes: without its front end, the core must not wait for the start to end.
    from batchlm.kernels.cpu_native import kernels_wanted

    if not kernels_wanted():
        pytest.skip("no CPU kernels to compile here")
    started = tmp_path / "compiler-started"
    compiler = tmp_path / "cc"
    compiler.write_text(f"#!/bin/sh\ntouch {started}\nwhile kill -0 $PPID 2>/dev/null; do sleep 0.1; done\n")
    compiler.chmod(0o755)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "batchlm.cli",
        "serve",
        "--model",
        str(tiny_model_dir()),
        "--port",
        str(port),
    ]
    # A cache of its own: no kernel built earlier to load instead.
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CC": str(compiler),
        "BATCHLM_CACHE": str(tmp_path / "cache"),
    }
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True)
    reader.start()
    core: list[int] = []
    try:
        wait_until(started.exists, timeout_s=120, what="the engine core to compile its kernels")
        core = [
            pid for pid in _children(process.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()
        ]
        assert core, "".join(lines)
        process.kill()
        process.wait(timeout=60)
        wait_until(lambda: not any(map(_running, core)), timeout_s=60, what="the orphaned core to exit")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in core:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_while_the_server_starts_stops_the_engine_core(
    signame: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Between the engine core's start (before the server's imports) and the server's own handlers,
    # Ctrl-C printed a traceback, and SIGTERM or SIGHUP ended the process with nothing cleaned up.
    if not hasattr(signal, signame):
        pytest.skip(f"no {signame} here")
    from batchlm.config import EngineConfig
    from batchlm.server import cli as server_cli
    from batchlm.server.state import ServerSettings
    from fake_engine import FakeEngine

    signum = getattr(signal, signame)
    engine = FakeEngine()
    stopped: list[bool] = []
    engine.begin_loading = lambda: signal.raise_signal(signum)  # type: ignore[method-assign]
    engine.stop_now = lambda: stopped.append(True)  # type: ignore[attr-defined]

    def unhandled(signum: int, frame: object) -> None:
        raise AssertionError("the start left the signal to the handler it found")

    previous = {
        sig: signal.getsignal(sig) for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))
    }
    for sig in previous:
        signal.signal(sig, unhandled)
    try:
        with caplog.at_level("WARNING"):
            code = server_cli._serve(engine, EngineConfig(model="unused"), ServerSettings(port=free_port()))
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the server's start")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert (code, stopped) == (0, [True])
    how = "interrupted" if signame == "SIGINT" else f"stopped by {signame}"
    assert f"batchlm serve: {how}; engine core stopped" in caplog.text
