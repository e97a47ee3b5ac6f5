"""`batchlm serve` starts the engine core process before its own imports and set-up when the model is
a local directory (begin_loading), and start() then finishes the job."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchlm import SamplingParams
from batchlm.config import EngineConfig
from batchlm.engine import async_engine
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.models.package_index import DownloadCancelled


def _core_processes() -> list[multiprocessing.process.BaseProcess]:
    return [child for child in multiprocessing.active_children() if child.name == "batchlm-engine-core"]


def test_begin_loading_starts_the_core_and_start_completes_it(tiny_model_dir: Callable[..., Path]) -> None:
    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), device="cpu"))
    before = len(_core_processes())
    engine.begin_loading()
    assert len(_core_processes()) == before + 1
    engine.begin_loading()  # a second call starts nothing more
    assert len(_core_processes()) == before + 1

    async def scenario() -> list[int]:
        await engine.start()
        try:
            params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
            tokens: list[int] = []
            async for output in engine.generate([5, 6, 7], params, "r0"):
                tokens.extend(output.outputs[0].token_ids)
            return tokens
        finally:
            await engine.shutdown()

    assert len(asyncio.run(scenario())) == 4
    assert len(_core_processes()) == before


def test_begin_loading_waits_for_start_when_the_model_is_not_a_local_directory(tmp_path: Path) -> None:
    # A hub id may need a download: that happens in start(), with the server already answering /health.
    before = len(_core_processes())
    AsyncLLMEngine(EngineConfig(model="someone/some-model", device="cpu")).begin_loading()
    AsyncLLMEngine(EngineConfig(model=str(tmp_path / "missing"), device="cpu")).begin_loading()
    assert len(_core_processes()) == before


def _slow_to_exit(ready: Any) -> None:
    """A core process that outlasts any grace period, ignoring SIGTERM as the real one does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(600)


def test_shutdown_stops_a_core_slower_to_exit_than_its_grace_period(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a loaded machine a core may take longer than the grace period to exit: shutdown() still
    returns with it gone."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    core = context.Process(target=_slow_to_exit, args=(ready,), name="slow-core", daemon=True)
    core.start()
    try:
        assert ready.wait(120), "the stand-in core never started"
        engine = AsyncLLMEngine(EngineConfig(model="unused", device="cpu"))
        engine._worker = core
        # No grace at all: the killed core is still waited for (a loaded machine may take a while to
        # run it to its end).
        monkeypatch.setattr(async_engine, "CORE_EXIT_GRACE_S", 0.0)
        asyncio.run(engine.shutdown())
        assert not core.is_alive()
        assert engine.is_dead
    finally:
        if core.is_alive():
            core.kill()
            core.join(60)


def test_start_cancelled_while_the_model_loads_stops_the_core(
    tiny_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the core loads cancels start(): the core is stopped then, not left to finish loading
    (a core reads no message, "shutdown" included, before it is ready)."""
    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), device="cpu"))
    waiting, release = threading.Event(), threading.Event()
    receive = engine._recv_or_eof

    def held_receive() -> Any:
        # Whether or not the core is ready by now, start() stays in this wait until cancelled.
        waiting.set()
        release.wait()
        return receive()

    monkeypatch.setattr(engine, "_recv_or_eof", held_receive)

    async def scenario() -> None:
        task = asyncio.ensure_future(engine.start())
        await asyncio.get_running_loop().run_in_executor(None, waiting.wait)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()  # the wait's thread must end before asyncio.run() can

    try:
        asyncio.run(scenario())
        core = engine._worker
        assert isinstance(core, multiprocessing.process.BaseProcess)
        core.join(timeout=60)  # a hang guard: a stopped core is gone at once
        assert not core.is_alive()
    finally:
        release.set()
        asyncio.run(engine.shutdown())


def test_a_stop_during_the_model_download_tells_the_download_to_give_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The download runs on a worker thread the interpreter waits for at exit: unless it is told to
    # stop, a server stopped meanwhile stays alive until the download ends.
    preparing = threading.Event()
    cancelled: list[bool] = []

    def prepare(config: EngineConfig, cancel: threading.Event | None = None) -> Path:
        preparing.set()
        cancelled.append(cancel is not None and cancel.wait(timeout=300))
        raise DownloadCancelled("stopped")

    monkeypatch.setattr(async_engine, "prepare_model_dir", prepare)
    engine = AsyncLLMEngine(EngineConfig(device="cpu"))

    async def scenario() -> None:
        starting = asyncio.ensure_future(engine.start())
        while not preparing.is_set():
            await asyncio.sleep(0.01)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting

    asyncio.run(scenario())  # waits for the worker thread on its way out
    assert cancelled == [True]
