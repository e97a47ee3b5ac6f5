"""The engine gives the same greedy tokens however a request is scheduled: alone, batched, split by
chunked prefill, after preemption, or served from the prefix cache — and the same as transformers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm import LLM, SamplingParams
from models_harness import hf_generated

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts(vocab: int = 300) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 17, 33, 9, 48, 1]
    return [torch.randint(10, vocab, (n,), generator=generator).tolist() for n in lengths]


def _tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]


def _llm(model_dir: Path, **kwargs: Any) -> LLM:
    kwargs.setdefault("device", "cpu")
    return LLM(model=str(model_dir), **kwargs)


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> list[list[int]]:
    llm = _llm(llama_dir, max_num_seqs=1)
    return [_tokens(llm, [p])[0] for p in _prompts()]


def test_batched_equals_alone(llama_dir: Path, reference: list[list[int]]) -> None:
    assert _tokens(_llm(llama_dir), _prompts()) == reference


def test_chunked_prefill_equals_alone(llama_dir: Path, reference: list[list[int]]) -> None:
    llm = _llm(llama_dir, max_num_batched_tokens=8, max_num_seqs=4)
    assert _tokens(llm, _prompts()) == reference


def test_preemption_equals_alone(llama_dir: Path, reference: list[list[int]]) -> None:
    # 20 blocks of 4 tokens hold the longest request (60 tokens) but not all six (185): it must preempt.
    llm = _llm(llama_dir, block_size=4, num_gpu_blocks_override=20, enable_prefix_caching=False)
    assert _tokens(llm, _prompts()) == reference
    assert llm.engine_core.stats().num_preemptions > 0


def test_prefix_cache_hits_give_same_tokens(llama_dir: Path) -> None:
    base = _prompts()[4]
    prompts = [[*base, 11, 12], [*base, 13]]
    cold = _tokens(_llm(llama_dir, enable_prefix_caching=False), prompts)
    llm = _llm(llama_dir, block_size=4)
    first = llm.generate(prompts[:1], GREEDY)[0]
    second = llm.generate(prompts[1:], GREEDY)[0]
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == cold
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == (len(base) // 4) * 4


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_transformers(tiny_model_dir: Callable[..., Path], model_type: str) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir(model_type)
    prompts = _prompts()[:3]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = [hf_generated(hf, prompt, 12) for prompt in prompts]
    assert _tokens(_llm(model_dir), prompts) == expected


def test_seeded_sampling_ignores_batch_mates(llama_dir: Path) -> None:
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    prompts = _prompts()
    llm = _llm(llama_dir)
    alone = llm.generate([prompts[1]], seeded)[0].outputs[0].token_ids
    mixed = llm.generate(prompts[:3], [other, seeded, other])[1].outputs[0].token_ids
    assert alone == mixed
    different_seed = llm.generate([prompts[1]], seeded.clone(seed=8))[0].outputs[0].token_ids
    assert different_seed != alone


def test_n_completions_share_the_prompt(llama_dir: Path) -> None:
    llm = _llm(llama_dir, block_size=4)
    prompt = _prompts()[4]
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True))[
        0
    ]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # The prompt's full blocks were computed once and shared by the other two sequences (each still
    # computes its last prompt token itself, so the block holding it is not served from the cache).
    stats = llm.engine_core.stats()
    assert stats.prefix_cache_hits == 2 * ((len(prompt) - 1) // 4) * 4


def test_stop_string_and_lengths(llama_dir: Path) -> None:
    llm = _llm(llama_dir)
    prompt = _prompts()[2]
    full = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].outputs[
        0
    ]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    if not stop.strip():
        pytest.skip("random text has no usable stop string at its midpoint")
    cut = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]))
    completion = cut[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == full.text[: full.text.index(stop)]
