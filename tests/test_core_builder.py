"""core_builder: freezing start-up objects out of the cyclic GC's reach; a CPU start's phase names."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from batchlm.config import EngineConfig
from batchlm.executor.core_builder import build_engine_core
from batchlm.gc_tuning import freeze_startup_objects
from batchlm.startup_log import PREFIX


def test_freeze_moves_existing_objects_to_the_permanent_generation() -> None:
    marker = [object()]
    gc.unfreeze()
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        assert not any(obj is marker for obj in gc.get_objects())  # frozen objects are not scanned
    finally:
        gc.unfreeze()
    assert any(obj is marker for obj in gc.get_objects())


def test_a_cpu_start_names_its_phases_for_the_cpu(
    tiny_model_dir: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = tiny_model_dir()
    with caplog.at_level(logging.INFO):
        _, info = build_engine_core(EngineConfig(model=str(model_dir), device="cpu"), model_dir)
    phases = [r.getMessage() for r in caplog.records if r.getMessage().startswith(PREFIX)]
    assert info.device == "cpu"
    assert not [line for line in phases if "CUDA" in line or "Triton" in line]
    for name in (
        "model runner (config, model, weights, CPU kernels)",
        "KV cache sizing",
        "KV cache allocation",
    ):
        assert any(line.startswith(f"startup: {name} ") for line in phases), (name, phases)
    assert "CPU compute threads:" in caplog.text
    # The default CPU KV cache holds what the running requests can fill, not a fixed 2 GiB.
    assert info.num_blocks == 32 * -(-info.max_model_len // info.block_size)


@pytest.mark.parametrize(("speculative", "newest"), [("off", 1), ("ngram", 4)])
def test_the_attention_learns_how_many_rows_a_step_writes_before_it(
    tiny_model_dir: Callable[..., Path], speculative: str, newest: int
) -> None:
    # A decode row's context ends with its newest token, or a verify chunk's 1 + 3 drafts: what a GPU
    # decode reads again after the step's KV write (kernels/paged_decode.py).
    model_dir = tiny_model_dir()
    config = EngineConfig(
        model=str(model_dir),
        device="cpu",
        speculative=speculative,
        num_speculative_tokens=3 if speculative == "ngram" else None,
    )
    core, _ = build_engine_core(config, model_dir)
    assert core.executor.attn.newest_decode_tokens == newest  # type: ignore[attr-defined]
