"""Qwen3ForCausalLM against transformers: greedy tokens, logprobs, q/k norms, batching, TP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchlm.models.qwen3 import Qwen3ForCausalLM
from batchlm.models.random_model import write_random_model
from models_harness import (
    PROMPTS,
    Chunk,
    assert_greedy_matches_hf,
    assert_mixed_batch_matches_requests_alone,
    greedy_generate,
    load_fp32_cpu,
    make_kv_caches,
    run_ranks,
    run_step,
    thread_groups,
)

NEW_TOKENS = 20


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_matches_transformers(tmp_path: Path, tied: bool) -> None:
    # Qwen3's head_dim is explicit and need not equal hidden / heads (here 32 * 4 != 64).
    path = write_random_model(tmp_path, "qwen3", {"tie_word_embeddings": tied, "head_dim": 32}, seed=7)
    loaded = load_fp32_cpu(path)
    assert isinstance(loaded.model, Qwen3ForCausalLM)
    assert loaded.shape.head_dim == 32
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)


def test_query_key_norms_are_loaded_and_used(tmp_path: Path) -> None:
    path = write_random_model(tmp_path, "qwen3", seed=8)
    loaded = load_fp32_cpu(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours_attn, hf_attn = loaded.model.model.layers[1].self_attn, hf.model.layers[1].self_attn
    torch.testing.assert_close(ours_attn.q_norm.weight, hf_attn.q_norm.weight, rtol=0, atol=0)
    torch.testing.assert_close(ours_attn.k_norm.weight, hf_attn.k_norm.weight, rtol=0, atol=0)
    before = run_step(loaded.model, make_kv_caches(loaded, 4), [Chunk(PROMPTS[0], 0, [0, 1])])
    with torch.no_grad():
        ours_attn.k_norm.weight.mul_(3.0)
    after = run_step(loaded.model, make_kv_caches(loaded, 4), [Chunk(PROMPTS[0], 0, [0, 1])])
    assert not torch.allclose(before, after, atol=1e-3)


def test_mixed_batch_matches_requests_run_alone(tmp_path: Path) -> None:
    loaded = load_fp32_cpu(write_random_model(tmp_path, "qwen3", seed=9))
    assert_mixed_batch_matches_requests_alone(loaded)


def test_tensor_parallel_two_ranks_match_single_rank(tmp_path: Path) -> None:
    path = write_random_model(tmp_path, "qwen3", {"tie_word_embeddings": True}, seed=10)
    single = load_fp32_cpu(path)
    ranks = [load_fp32_cpu(path, tp=group) for group in thread_groups(2)]
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[0], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[0], 8), 2):
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)
