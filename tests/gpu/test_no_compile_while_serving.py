"""Serving must not meet a Triton kernel variant that start-up did not compile: a JIT compile in the
middle of a step stalls every request in the batch (seen as multi-second TTFTs in the W1 online run)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from batchlm import LLM, SamplingParams
from batchlm.kernels.compile_watch import compiles_after_startup
from batchlm.request import EngineCoreRequest

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


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
    rng = random.Random(0)
    # One arrival per step: every step mixes a prefill chunk with 0..47 decodes of contexts that grow
    # from a few tokens to ~1,400, so decode batch sizes, block-table widths and the offsets of the
    # prefill rows all take many values, as they do under live traffic.
    for index in range(48):
        prompt = tuple(rng.randrange(10, 300) for _ in range(rng.randrange(1, 1200)))
        params = SamplingParams(temperature=1.0, max_tokens=rng.randrange(8, 200), ignore_eos=True)
        core.add_request(
            EngineCoreRequest(str(index), prompt, params, eos_token_ids=(2,), arrival_time=time.time())
        )
        core.step()
    while core.has_work():
        core.step()
    assert core.scheduler.num_free_blocks == core.scheduler.num_total_blocks
    assert compiles_after_startup() == before
