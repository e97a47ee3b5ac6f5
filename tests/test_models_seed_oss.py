"""Seed-OSS against transformers: Llama's block with q/k/v biases (attention_bias, on by default), an
o_proj bias of its own (attention_out_bias) and MLP biases (mlp_bias), each read from its own field;
a stated sliding window left unused as transformers leaves it; batching, TP and GGUF files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm.models.llama import SeedOssForCausalLM
from batchlm.models.random_model import write_random_model
from models_harness import (
    PROMPTS,
    assert_greedy_matches_hf,
    assert_mixed_batch_matches_requests_alone,
    greedy_generate,
    hf_reference_model,
    load_fp32_cpu,
    run_ranks,
    thread_groups,
)

NEW_TOKENS = 16
# Seed-OSS-36B's biases: q/k/v only (SeedOssConfig's defaults), every one, and none.
BIASES: dict[str, dict[str, Any]] = {
    "published": {},
    "all": {"attention_out_bias": True, "mlp_bias": True},
    "none": {"attention_bias": False},
}


def assert_matches_transformers(model_dir: Path, use_cache: bool = True) -> None:
    loaded = load_fp32_cpu(model_dir)
    assert isinstance(loaded.model, SeedOssForCausalLM)
    hf = hf_reference_model(model_dir)
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS, use_cache)


@pytest.mark.parametrize("biases", sorted(BIASES))
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_matches_transformers(tmp_path: Path, biases: str, tied: bool) -> None:
    model_dir = write_random_model(tmp_path, "seed_oss", {**BIASES[biases], "tie_word_embeddings": tied}, 61)
    attention = load_fp32_cpu(model_dir).model.model.layers[0].self_attn
    expected = {**{"attention_bias": True, "attention_out_bias": False}, **BIASES[biases]}
    assert (attention.qkv_proj.bias is not None) == expected["attention_bias"]
    assert (attention.o_proj.bias is not None) == expected["attention_out_bias"]
    assert_matches_transformers(model_dir)


def test_a_stated_sliding_window_is_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # transformers' Seed-OSS is its Llama model, whose attention takes the whole context whatever the
    # config says (a window shorter than the prompts would change the logits). Its generate() is run
    # without a cache: the DynamicCache it builds from such a config keeps only the window's keys.
    model_dir = write_random_model(tmp_path, "seed_oss", {"sliding_window": 4}, seed=62)
    with caplog.at_level(logging.WARNING, logger="batchlm.models.llama"):
        loaded = load_fp32_cpu(model_dir)
    assert loaded.config.sliding_window is None
    assert "sliding_window is not used by SeedOss models" in caplog.text
    assert_matches_transformers(model_dir, use_cache=False)


def test_mixed_batch_matches_requests_run_alone(tmp_path: Path) -> None:
    model_dir = write_random_model(tmp_path, "seed_oss", BIASES["all"], seed=63)
    assert_mixed_batch_matches_requests_alone(load_fp32_cpu(model_dir))


def test_tensor_parallel_two_ranks_match_single_rank(tmp_path: Path) -> None:
    # The o_proj and down_proj biases are added once, after the ranks' partial sums.
    path = write_random_model(tmp_path, "seed_oss", BIASES["all"], seed=64)
    single = load_fp32_cpu(path)
    ranks = [load_fp32_cpu(path, tp=group) for group in thread_groups(2)]
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[0], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[0], 8), 2):
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("biases", ["published", "all"])
def test_gguf_file_matches_transformers(tmp_path: Path, biases: str) -> None:
    # As llama.cpp writes a seed_oss file: q/k rows as HF's (not permuted), the norm before the MLP as
    # post_attention_norm, the biases present as tensors (the config's fields come from them).
    from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
    from gguf_builder import write_tiny_gguf

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "seed_oss", "F32", overrides=BIASES[biases], seed=65)
    model_dir = prepare_gguf_model_dir(gguf_path, tmp_path / "cache")
    loaded = load_fp32_cpu(model_dir)
    assert isinstance(loaded.model, SeedOssForCausalLM)
    assert (loaded.model.model.layers[0].self_attn.o_proj.bias is not None) == (biases == "all")
    hf = hf_reference_model(tmp_path / "hf")
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)
