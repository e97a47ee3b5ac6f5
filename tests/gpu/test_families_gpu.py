"""Gemma 2, Gemma 3, Phi-3 and Mistral with an 8-token window on CUDA (Triton attention with windows
and soft-caps, CUDA-graph decode, async scheduling): transformers' greedy tokens (float32). Then
head geometries of real checkpoints the tiny defaults lack: Phi-3's head dim 96 (Phi-2's 80, with
partial rotary), Gemma's 256, and GQA groups of 3 (SmolLM2) and 7 (Qwen2.5)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from devices import require_cuda

from batchlm import LLM
from test_engine_families import FAMILIES, GREEDY, prompts, transformers_tokens

pytestmark = pytest.mark.gpu

require_cuda()


# hidden_size = heads * head_dim, as in the real checkpoints.
REAL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "phi3-head-dim-96": ("phi3", {"hidden_size": 192, "num_attention_heads": 2, "num_key_value_heads": 2,
                                  "head_dim": 96, "pad_token_id": 0}),
    "phi-head-dim-80-partial-rotary": ("phi3", {"hidden_size": 160, "num_attention_heads": 2,
                                                "num_key_value_heads": 1, "head_dim": 80,
                                                "partial_rotary_factor": 0.4, "pad_token_id": 0}),
    "gemma2-head-dim-256": ("gemma2", {**FAMILIES["gemma2"][1], "hidden_size": 256, "num_attention_heads": 2,
                                       "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256}),
    "llama-groups-of-3": ("llama", {"hidden_size": 144, "num_attention_heads": 9, "num_key_value_heads": 3,
                                    "head_dim": 16}),
    "qwen2-groups-of-7": ("qwen2", {"hidden_size": 112, "num_attention_heads": 14, "num_key_value_heads": 2,
                                    "head_dim": 16}),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES) + sorted(REAL_SHAPES))
def test_greedy_matches_transformers_on_cuda(tiny_model_dir: Callable[..., Path], family: str) -> None:
    model_type, overrides = FAMILIES[family] if family in FAMILIES else REAL_SHAPES[family]
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
