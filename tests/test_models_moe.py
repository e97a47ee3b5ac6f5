"""Qwen3-MoE and Mixtral against transformers: greedy tokens and logprobs, dense/sparse layer choice,
both checkpoint layouts of the experts, missing experts, batching, and tensor parallelism."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from batchlm.layers.moe import SparseMoeBlock
from batchlm.models.llama import LlamaMLP
from batchlm.models.loader import LoadedModel
from batchlm.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM
from batchlm.models.random_model import write_random_model
from models_harness import (
    PROMPTS,
    assert_greedy_matches_hf,
    assert_mixed_batch_matches_requests_alone,
    greedy_generate,
    load_fp32_cpu,
    run_ranks,
    thread_groups,
)

NEW_TOKENS = 16


def _hf(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _assert_greedy_matches(path: Path) -> LoadedModel:
    loaded, hf = load_fp32_cpu(path), _hf(path)
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)
    return loaded


QWEN3_MOE_CASES = {
    "all-sparse": {},
    "no-renormalize": {"norm_topk_prob": False},
    "dense-first-layer": {"num_hidden_layers": 3, "mlp_only_layers": [0]},
    "every-second-layer": {"num_hidden_layers": 3, "decoder_sparse_step": 2, "tie_word_embeddings": True},
}


@pytest.mark.parametrize("case", sorted(QWEN3_MOE_CASES))
def test_qwen3_moe_greedy_matches_transformers(tmp_path: Path, case: str) -> None:
    path = write_random_model(tmp_path, "qwen3_moe", QWEN3_MOE_CASES[case], seed=3)
    loaded = _assert_greedy_matches(path)
    assert isinstance(loaded.model, Qwen3MoeForCausalLM)
    hf_sparse = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in _hf(path).model.layers]
    ours_sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in loaded.model.model.layers]
    assert ours_sparse == hf_sparse
    assert all(isinstance(layer.mlp, SparseMoeBlock | LlamaMLP) for layer in loaded.model.model.layers)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_mixtral_greedy_matches_transformers(tmp_path: Path, top_k: int) -> None:
    path = write_random_model(tmp_path, "mixtral", {"num_experts_per_tok": top_k}, seed=4)
    loaded = _assert_greedy_matches(path)
    assert isinstance(loaded.model, MixtralForCausalLM)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_stacked_expert_tensors_load_too(tmp_path: Path, model_type: str) -> None:
    """transformers' in-memory names (experts stacked, Mixtral's block under `mlp`) as a checkpoint."""
    path = write_random_model(tmp_path / "per-expert", model_type, seed=5)
    stacked_dir = tmp_path / "stacked"
    stacked_dir.mkdir()
    (stacked_dir / "config.json").write_text((path / "config.json").read_text())
    state = {name: tensor.contiguous() for name, tensor in _hf(path).state_dict().items()}
    assert any(name.endswith("experts.gate_up_proj") for name in state)
    save_file(state, str(stacked_dir / "model.safetensors"))
    per_expert, stacked = load_fp32_cpu(path), load_fp32_cpu(stacked_dir)
    for ours, theirs in zip(per_expert.model.parameters(), stacked.model.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_missing_expert_tensor_is_named(tmp_path: Path) -> None:
    path = write_random_model(tmp_path, "mixtral", seed=6)
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 'model\.layers\.1\.mlp\.experts\.5\.w3\.weight'"):
        load_fp32_cpu(path)


def test_mixed_batch_matches_requests_run_alone(tmp_path: Path) -> None:
    # Experts see different token mixes batched and alone; each token's output must not change.
    loaded = load_fp32_cpu(write_random_model(tmp_path, "qwen3_moe", seed=9))
    assert_mixed_batch_matches_requests_alone(loaded)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_tensor_parallel_two_ranks_match_single_rank(tmp_path: Path, model_type: str) -> None:
    path = write_random_model(tmp_path, model_type, seed=10)
    single = load_fp32_cpu(path)
    ranks = [load_fp32_cpu(path, tp=group) for group in thread_groups(2)]
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[0], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[0], 8), 2):
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("model_type", "window"),
    [("mixtral", {"sliding_window": 8}), ("qwen3_moe", {"sliding_window": 8, "use_sliding_window": True})],
)
def test_context_longer_than_the_sliding_window(
    tmp_path: Path, model_type: str, window: dict[str, Any]
) -> None:
    """Prompts of 7 and 24 tokens plus 16 new ones run past an 8-token window, as transformers does."""
    path = write_random_model(tmp_path, model_type, window, seed=11)
    loaded = _assert_greedy_matches(path)
    assert loaded.shape.max_model_len > 8
    assert all(layer.attention.sliding_window == 8 for layer in loaded.model.config.layers)
