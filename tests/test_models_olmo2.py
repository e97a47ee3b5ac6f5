"""OLMo 2 against transformers: norms after the attention and the MLP, q/k norms over whole projections
(also across tensor-parallel ranks), float32 weight products in the norms; GGUF files as llama.cpp
writes them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.loader import load_model
from batchlm.models.olmo2 import Olmo2ForCausalLM
from batchlm.models.random_model import write_random_model
from gguf_builder import write_tiny_gguf
from models_harness import (
    CPU,
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
    path = write_random_model(tmp_path, "olmo2", {"tie_word_embeddings": tied, "pad_token_id": 0}, seed=51)
    loaded = load_fp32_cpu(path)
    assert isinstance(loaded.model, Olmo2ForCausalLM)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)


def test_query_key_norms_span_the_whole_projection(tmp_path: Path) -> None:
    loaded = load_fp32_cpu(write_random_model(tmp_path, "olmo2", {"pad_token_id": 0}, seed=52))
    attention = loaded.model.model.layers[1].self_attn
    assert attention.q_norm.weight.shape == (4 * 16,) and attention.k_norm.weight.shape == (2 * 16,)
    before = run_step(loaded.model, make_kv_caches(loaded, 4), [Chunk(PROMPTS[0], 0, [0, 1])])
    with torch.no_grad():  # one head's part of the k norm: felt through the whole projection's mean
        attention.k_norm.weight[:16].mul_(3.0)
    after = run_step(loaded.model, make_kv_caches(loaded, 4), [Chunk(PROMPTS[0], 0, [0, 1])])
    assert not torch.allclose(before, after, atol=1e-3)


@torch.no_grad()
def test_bfloat16_norms_round_as_transformers_does(tmp_path: Path) -> None:
    # transformers multiplies by the norm weight in float32 and casts after; Llama's RMSNorm casts
    # first. The final norm and a layer's q norm give transformers' very bits.
    path = write_random_model(tmp_path, "olmo2", {"pad_token_id": 0}, seed=53)
    loaded = load_model(path, torch.bfloat16, CPU, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    hidden = (torch.randn(5, 64) * 3).to(torch.bfloat16)
    assert torch.equal(loaded.model.model.norm(hidden), hf.model.norm(hidden))
    q = (torch.randn(5, 64) * 3).to(torch.bfloat16)
    ours_q_norm = loaded.model.model.layers[0].self_attn.q_norm
    assert torch.equal(ours_q_norm(q), hf.model.layers[0].self_attn.q_norm(q))


def test_mixed_batch_matches_requests_run_alone(tmp_path: Path) -> None:
    loaded = load_fp32_cpu(write_random_model(tmp_path, "olmo2", {"pad_token_id": 0}, seed=54))
    assert_mixed_batch_matches_requests_alone(loaded)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-heads-split", "kv-head-replicated"])
def test_tensor_parallel_two_ranks_match_single_rank(tmp_path: Path, kv_heads: int) -> None:
    # Each rank norms its heads by the mean square over all of them (a replicated KV head counted once).
    path = write_random_model(
        tmp_path, "olmo2", {"num_key_value_heads": kv_heads, "pad_token_id": 0}, seed=55
    )
    single = load_fp32_cpu(path)
    ranks = [load_fp32_cpu(path, tp=group) for group in thread_groups(2)]
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[1], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[1], 8), 2):
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)


def test_gguf_file_matches_transformers(tmp_path: Path) -> None:
    # As llama.cpp writes an olmo2 file: q/k rows as HF has them (NeoX RoPE), the two norms a block
    # under Gemma's names for them.
    gguf_path = write_tiny_gguf(
        tmp_path / "tiny.gguf", "olmo2", "F32", overrides={"pad_token_id": 0}, seed=56
    )
    loaded = load_fp32_cpu(prepare_gguf_model_dir(gguf_path, tmp_path / "cache"))
    assert isinstance(loaded.model, Olmo2ForCausalLM)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)
