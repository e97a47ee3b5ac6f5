"""LlamaForCausalLM (and Mistral, Qwen2) against transformers: greedy tokens, logprobs, batching, TP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchlm.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from batchlm.models.loader import LoadedModel
from batchlm.models.random_model import write_random_model
from models_harness import (
    LOGPROB_ATOL,
    PROMPTS,
    Chunk,
    assert_greedy_matches_hf,
    greedy_generate,
    hf_greedy,
    load_fp32_cpu,
    make_kv_caches,
    run_ranks,
    run_step,
    thread_groups,
)

NEW_TOKENS = 20
# fp32 on the CPU: differences come only from summation order.


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(
    ("model_type", "model_class"),
    [("llama", LlamaForCausalLM), ("mistral", MistralForCausalLM), ("qwen2", Qwen2ForCausalLM)],
)
def test_greedy_matches_transformers(tmp_path: Path, model_type: str, model_class: type, tied: bool) -> None:
    path = write_random_model(tmp_path, model_type, {"tie_word_embeddings": tied}, seed=3)
    loaded = load_fp32_cpu(path)
    assert type(loaded.model) is model_class
    if tied:
        assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize(
    "window_fields",
    [{"sliding_window": 4}, {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]}],
    ids=["window", "window-and-layer-types"],
)
def test_llama_attends_past_a_stated_window_as_transformers_does(tmp_path: Path, window_fields: dict) -> None:
    # transformers' Llama model attends to the whole context whatever its config states (only its
    # KV cache drops keys past a stated window, so its cached generate is compared with nothing);
    # Mistral, built on the same class, keeps its window.
    path = write_random_model(tmp_path, "llama", window_fields, seed=7)
    loaded = load_fp32_cpu(path)
    assert loaded.model.config.sliding_window is None
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours, our_logprobs = greedy_generate(loaded, PROMPTS[1], NEW_TOKENS)
    theirs, their_logprobs = hf_greedy(hf, PROMPTS[1], NEW_TOKENS, use_cache=False)
    assert ours == theirs
    torch.testing.assert_close(our_logprobs, their_logprobs, atol=LOGPROB_ATOL, rtol=0)
    mistral = load_fp32_cpu(
        write_random_model(tmp_path / "mistral", "mistral", {"sliding_window": 4}, seed=7)
    )
    assert mistral.model.config.sliding_window == 4


def test_qwen2_projections_have_qkv_bias_only(tmp_path: Path) -> None:
    model = load_fp32_cpu(write_random_model(tmp_path, "qwen2")).model
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None
    assert model.model.layers[0].mlp.gate_up_proj.bias is None


def test_explicit_head_dim_and_attention_bias(tmp_path: Path) -> None:
    # head_dim * heads != hidden_size, and Llama's optional biases on every attention projection.
    overrides = {"head_dim": 24, "attention_bias": True, "mlp_bias": True}
    path = write_random_model(tmp_path, "llama", overrides, seed=4)
    loaded = load_fp32_cpu(path)
    assert loaded.shape.head_dim == 24
    assert loaded.model.model.layers[0].self_attn.o_proj.bias is not None
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, [PROMPTS[0]], NEW_TOKENS)


def test_mixed_batch_matches_requests_run_alone(tmp_path: Path) -> None:
    loaded = load_fp32_cpu(write_random_model(tmp_path, "llama", seed=5))
    gen = torch.Generator().manual_seed(0)
    prompt_a, prompt_b, prompt_c, prompt_d = (
        torch.randint(3, 320, (n,), generator=gen).tolist() for n in (9, 4, 7, 11)
    )
    # Scattered, non-contiguous blocks per request (block size 4).
    blocks = {"a": [9, 2, 14], "b": [5, 0], "c": [1, 11], "d": [3, 12, 7]}
    caches = make_kv_caches(loaded, 16)
    # Step 1: three prefills (d only its first 5 tokens, as a chunked prefill would).
    run_step(
        loaded.model,
        caches,
        [
            Chunk(prompt_a, 0, blocks["a"]),
            Chunk(prompt_b, 0, blocks["b"]),
            Chunk(prompt_d[:5], 0, blocks["d"]),
        ],
    )
    # Step 2: decodes of a and b, a fresh prefill of c and the rest of d, in one varlen batch.
    batched = run_step(
        loaded.model,
        caches,
        [
            Chunk([77], len(prompt_a), blocks["a"]),
            Chunk([78], len(prompt_b), blocks["b"]),
            Chunk(prompt_c, 0, blocks["c"]),
            Chunk(prompt_d[5:], 5, blocks["d"]),
        ],
    )
    alone = [
        _alone(loaded, [*prompt_a, 77]),
        _alone(loaded, [*prompt_b, 78]),
        _alone(loaded, prompt_c),
        _alone(loaded, prompt_d),
    ]
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)


def _alone(loaded: LoadedModel, tokens: list[int]) -> torch.Tensor:
    caches = make_kv_caches(loaded, 8)
    return run_step(loaded.model, caches, [Chunk(tokens, 0, list(range(8)))])


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
def test_tensor_parallel_two_ranks_match_single_rank(tmp_path: Path, kv_heads: int) -> None:
    # vocab 321 does not divide by 2: the last rank's vocabulary shard carries a padding row.
    path = write_random_model(tmp_path, "llama", {"num_key_value_heads": kv_heads, "vocab_size": 321}, seed=6)
    single = load_fp32_cpu(path)
    ranks = [load_fp32_cpu(path, tp=group) for group in thread_groups(2)]
    assert ranks[1].shape.num_heads == 2 and ranks[1].shape.num_kv_heads == 1
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[0], 8)
    results = run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[0], 8), 2)
    for tokens, logprobs in results:
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)
