"""Serving must not meet a Triton kernel variant that start-up did not compile: a JIT compile in the
middle of a step stalls every request in the batch (seen as multi-second TTFTs in the W1 online run)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from devices import require_cuda
from engine_runs import one_arrival_a_step

from batchlm import LLM
from batchlm.kernels.compile_watch import compiles_after_startup

pytestmark = pytest.mark.gpu

require_cuda()


def test_staggered_arrivals_compile_nothing_after_startup(tiny_model_dir: Callable[..., Path]) -> None:
    # A head geometry (group of 3, head_dim 64) no other test uses, so no kernel variant of this
    # module's shapes is in Triton's in-process cache before this engine starts.
    model_dir = tiny_model_dir(
        "llama", hidden_size=192, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=2048,
    )  # fmt: skip
    llm = LLM(
        model=str(model_dir),
        device="cuda",
        dtype="bfloat16",
        max_model_len=1536,
        num_gpu_blocks_override=1024,
    )
    core = llm.engine_core
    before = compiles_after_startup()
    # Each step mixes a prefill chunk with 0..47 decodes of contexts that grow to ~1,400 tokens.
    one_arrival_a_step(llm, 48, max_tokens_below=200, seed=0)
    assert core.scheduler.num_free_blocks == core.scheduler.num_total_blocks
    assert compiles_after_startup() == before
