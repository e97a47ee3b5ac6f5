"""Prompt log-probabilities on CUDA (async scheduling, CUDA-graph decodes beside the prompts' eager
steps, grammar-free): the same as the CPU engine's, and the generated tokens unchanged by asking."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from devices import require_cuda

from batchlm import LLM, SamplingParams
from batchlm.outputs import TokenLogprobs

pytestmark = pytest.mark.gpu

require_cuda()

ASK = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=2)


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(10, 300, (n,), generator=generator).tolist() for n in (300, 7, 1, 130)]


def _scores(llm: LLM, params: list[SamplingParams]) -> list[list[TokenLogprobs | None] | None]:
    return [output.prompt_logprobs for output in llm.generate(_prompts(), params)]


def test_prompt_logprobs_on_cuda_match_the_cpu_engine(tiny_model_dir: Callable[..., Path]) -> None:
    model_dir = tiny_model_dir("llama")
    asks = [ASK, ASK.clone(prompt_logprobs=None), ASK, ASK]
    cpu = _scores(LLM(model=str(model_dir), device="cpu"), asks)
    # Chunks of 64 tokens: the long prompts take several steps, beside the short ones' decodes.
    gpu = LLM(
        model=str(model_dir),
        device="cuda",
        dtype="float32",
        async_scheduling="on",
        num_gpu_blocks_override=256,
        max_num_batched_tokens=64,
    )
    got = _scores(gpu, asks)
    assert got[1] is None and cpu[1] is None
    for on_gpu, on_cpu in zip(got, cpu, strict=True):
        if on_cpu is None:
            continue
        assert on_gpu is not None and len(on_gpu) == len(on_cpu)
        for a, b in zip(on_gpu[1:], on_cpu[1:], strict=True):
            assert a is not None and b is not None
            assert math.isclose(a.logprob, b.logprob, abs_tol=1e-3)
    plain = gpu.generate(_prompts(), ASK.clone(prompt_logprobs=None))
    asked = gpu.generate(_prompts(), ASK)
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in asked]
    scheduler = gpu.engine_core.scheduler
    assert scheduler.num_free_blocks == scheduler.num_total_blocks
