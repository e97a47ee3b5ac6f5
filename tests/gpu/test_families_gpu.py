"""Gemma 2, Gemma 3, Phi-3 and Mistral with an 8-token window on CUDA (Triton attention with windows
and soft-caps, CUDA-graph decode, async scheduling): transformers' greedy tokens (float32)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from batchlm import LLM
from test_engine_families import FAMILIES, GREEDY, prompts, transformers_tokens

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers_on_cuda(tiny_model_dir: Callable[..., Path], family: str) -> None:
    model_type, overrides = FAMILIES[family]
    model_dir = tiny_model_dir(model_type, seed=5, **overrides)
    expected = transformers_tokens(model_dir, prompts())
    llm = LLM(
        model=str(model_dir), device="cuda", dtype="float32", num_gpu_blocks_override=128, block_size=16
    )
    assert llm.engine_core is not None
    chunked = LLM(model=str(model_dir), device="cuda", dtype="float32", num_gpu_blocks_override=128,
                  max_num_batched_tokens=16, max_num_seqs=3)  # fmt: skip
    for engine in (llm, chunked):
        assert [list(out.outputs[0].token_ids) for out in engine.generate(prompts(), GREEDY)] == expected
