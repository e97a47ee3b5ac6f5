"""Phi-3's LongRoPE switch on CUDA (the Triton RoPE and RoPE-folded KV-write kernels reading the long
rows, CUDA-graph decode, async scheduling): transformers' greedy tokens (float32) for prompts on either
side of the switch and for sequences that cross it while decoding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from devices import require_cuda

from batchlm import LLM
from test_longrope_switch import GLOBAL_LAYERS_ONLY, GREEDY, OVERRIDES, prompts, transformers_tokens

pytestmark = pytest.mark.gpu

require_cuda()


@pytest.mark.parametrize("async_scheduling", ["on", "off"])
def test_longrope_switch_matches_transformers_on_cuda(
    tiny_model_dir: Callable[..., Path], async_scheduling: str
) -> None:
    model_dir = tiny_model_dir("phi3", seed=9, **OVERRIDES)
    expected = transformers_tokens(model_dir, prompts())
    llm = LLM(model=str(model_dir), device="cuda", dtype="float32", num_gpu_blocks_override=128,
              block_size=16, async_scheduling=async_scheduling)  # fmt: skip
    assert [list(out.outputs[0].token_ids) for out in llm.generate(prompts(), GREEDY)] == expected
    assert llm.engine_core is not None and llm.engine_core.stats().num_preemptions == 0


def test_longrope_on_the_global_layers_only_matches_transformers_on_cuda(
    tiny_model_dir: Callable[..., Path],
) -> None:
    # The local layer's table (plain RoPE) is read at the long sequences' offset positions too.
    model_dir = tiny_model_dir("gemma3_text", seed=3, **GLOBAL_LAYERS_ONLY)
    expected = transformers_tokens(model_dir, prompts())
    llm = LLM(
        model=str(model_dir), device="cuda", dtype="float32", num_gpu_blocks_override=128, block_size=16
    )
    assert [list(out.outputs[0].token_ids) for out in llm.generate(prompts(), GREEDY)] == expected
