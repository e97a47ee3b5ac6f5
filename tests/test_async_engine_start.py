"""`batchlm serve` starts the engine core process before its own imports and set-up when the model is
a local directory (begin_loading), and start() then finishes the job."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from pathlib import Path

from batchlm import SamplingParams
from batchlm.config import EngineConfig
from batchlm.engine.async_engine import AsyncLLMEngine


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
