"""GPU memory across engines of one process: an engine created after an earlier one was dropped sizes
its KV cache from what is free now, not from the earlier engine's peak."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from batchlm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _blocks_after_one_request(model_dir: Path) -> int:
    llm = LLM(model=str(model_dir), device="cuda", enforce_eager=True)
    output = llm.generate([[1, 5, 9]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(output.outputs[0].token_ids) == 4
    return llm.info.num_blocks


def test_a_second_engine_gets_the_memory_the_first_one_gave_back(
    tiny_model_dir: Callable[..., Path],
) -> None:
    model_dir = tiny_model_dir("llama")
    first = _blocks_after_one_request(model_dir)
    gc.collect()
    torch.cuda.empty_cache()
    second = _blocks_after_one_request(model_dir)
    assert first > 0
    assert second >= 0.95 * first, (first, second)
