"""Mixture-of-experts models through the engine: the same greedy tokens as transformers, and however a
request is scheduled (alone, batched, in prefill chunks, after preemption, from the prefix cache)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm import LLM, SamplingParams
from models_harness import hf_generated

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
MOE_TYPES = ["qwen3_moe", "mixtral"]


def _prompts(vocab: int = 300) -> list[list[int]]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(10, vocab, (n,), generator=generator).tolist() for n in (6, 19, 31, 2, 44)]


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, GREEDY)]


def _llm(model_dir: Path, **kwargs: Any) -> LLM:
    return LLM(model=str(model_dir), device="cpu", **kwargs)


@pytest.fixture(scope="module", params=MOE_TYPES)
def moe_dir(request: pytest.FixtureRequest, tiny_model_dir: Callable[..., Path]) -> Path:
    # Three layers, the first dense for Qwen3-MoE (mlp_only_layers), so both MLP kinds are scheduled.
    extra = {"mlp_only_layers": [0]} if request.param == "qwen3_moe" else {}
    return tiny_model_dir(request.param, num_hidden_layers=3, **extra)


@pytest.fixture(scope="module")
def transformers_tokens(moe_dir: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    expected = []
    for prompt in _prompts():
        expected.append(hf_generated(hf, prompt, GREEDY.max_tokens))
    return expected


def test_alone_matches_transformers(moe_dir: Path, transformers_tokens: list[list[int]]) -> None:
    llm = _llm(moe_dir, max_num_seqs=1)
    assert [_tokens(llm, [p])[0] for p in _prompts()] == transformers_tokens


def test_batched_matches_transformers(moe_dir: Path, transformers_tokens: list[list[int]]) -> None:
    assert _tokens(_llm(moe_dir), _prompts()) == transformers_tokens


def test_chunked_prefill_matches_transformers(moe_dir: Path, transformers_tokens: list[list[int]]) -> None:
    llm = _llm(moe_dir, max_num_batched_tokens=8, max_num_seqs=3)
    assert _tokens(llm, _prompts()) == transformers_tokens


def test_preemption_matches_transformers(moe_dir: Path, transformers_tokens: list[list[int]]) -> None:
    # 16 blocks of 4 tokens hold the longest request (54 tokens) but not all five at once.
    llm = _llm(moe_dir, block_size=4, num_gpu_blocks_override=16, enable_prefix_caching=False)
    assert _tokens(llm, _prompts()) == transformers_tokens
    assert llm.engine_core.stats().num_preemptions > 0


def test_prefix_cache_hits_give_same_tokens(moe_dir: Path) -> None:
    base = _prompts()[4]
    prompts = [[*base, 11, 12], [*base, 13]]
    cold = _tokens(_llm(moe_dir, enable_prefix_caching=False), prompts)
    llm = _llm(moe_dir, block_size=4)
    first = llm.generate(prompts[:1], GREEDY)[0]
    second = llm.generate(prompts[1:], GREEDY)[0]
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == cold
    assert second.num_cached_tokens == (len(base) // 4) * 4
