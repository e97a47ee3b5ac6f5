"""gpt-oss against transformers: greedy tokens and logprobs (sinks, biases, the clamped SwiGLU and the
window each move the logprobs past the tolerance when dropped), batching, tensor parallelism, YaRN's
frequencies, the float32 norm, and the refusal of the fused CPU decode stack. The released MXFP4
checkpoints: tests/test_models_gpt_oss_mxfp4.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.kernels.cpu_quant import quant_library
from batchlm.layers.activation import ClampedSwiGLU
from batchlm.layers.moe import SparseMoeBlock
from batchlm.layers.norm import Float32WeightRMSNorm, RMSNorm
from batchlm.layers.rope_scaling import inv_freq_and_scaling, read_rope_parameters
from batchlm.models.gpt_oss import GptOssForCausalLM
from batchlm.models.random_model import write_random_model
from batchlm.runner import fused_decode
from models_harness import (
    CPU,
    PROMPTS,
    assert_greedy_matches_hf,
    assert_mixed_batch_matches_requests_alone,
    greedy_generate,
    hf_reference_model,
    load_fp32_cpu,
    make_kv_caches,
    run_ranks,
    thread_groups,
)

NEW_TOKENS = 16
# A 4-token window (PROMPTS run to 24 tokens), and a SwiGLU limit the tiny experts' values reach.
WINDOW = {"sliding_window": 4, "swiglu_limit": 0.1}
CASES: dict[str, dict[str, Any]] = {
    "window-and-clamp": WINDOW,
    "four-layers-tied": {**WINDOW, "num_hidden_layers": 4, "tie_word_embeddings": True},
    "top-1-of-4": {**WINDOW, "num_experts_per_tok": 1},
    "no-attention-bias": {**WINDOW, "attention_bias": False},
}


def _write(tmp_path: Path, overrides: dict[str, Any], seed: int = 3) -> Path:
    return write_random_model(tmp_path, "gpt_oss", overrides, seed=seed)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers(tmp_path: Path, case: str) -> None:
    path = _write(tmp_path, CASES[case])
    loaded = load_fp32_cpu(path)
    assert isinstance(loaded.model, GptOssForCausalLM)
    assert all(isinstance(layer.mlp, SparseMoeBlock) for layer in loaded.model.model.layers)
    assert_greedy_matches_hf(loaded, hf_reference_model(path), PROMPTS, NEW_TOKENS)


def test_every_layer_has_sinks_and_the_config_windows(tmp_path: Path) -> None:
    loaded = load_fp32_cpu(_write(tmp_path, WINDOW))
    layers = loaded.model.config.layers
    assert all(layer.attention.sinks for layer in layers)
    assert [layer.attention.sliding_window for layer in layers] == [4, None]
    assert all(layer.attention.scale == 16**-0.5 for layer in layers)
    attention = loaded.model.model.layers[0].self_attn
    assert attention.sinks is not None and attention.sinks.abs().sum() > 0
    experts = loaded.model.model.layers[0].mlp.experts
    assert isinstance(experts.act_fn, ClampedSwiGLU) and experts.act_fn.limit == 0.1
    assert experts.gate_up_proj_bias is not None and experts.gate_up_proj_bias.abs().sum() > 0


def test_mixed_batch_matches_requests_run_alone(tmp_path: Path) -> None:
    assert_mixed_batch_matches_requests_alone(load_fp32_cpu(_write(tmp_path, WINDOW)))


def test_tensor_parallel_two_ranks_match_single_rank(tmp_path: Path) -> None:
    """Each rank's sinks, gate/up rows and gate/up bias; the down bias added once, after the sum."""
    path = _write(tmp_path, WINDOW)
    single = load_fp32_cpu(path)
    ranks = [load_fp32_cpu(path, tp=group) for group in thread_groups(2)]
    assert ranks[1].model.model.layers[0].self_attn.sinks.shape == (2,)
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[1], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[1], 8), 2):
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_frequencies_are_transformers_to_the_bit(truncate: bool) -> None:
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = GptOssConfig(num_hidden_layers=2)  # the released models' RoPE: YaRN over 4096 x 32
    config.rope_parameters["truncate"] = truncate
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    ours, our_factor = inv_freq_and_scaling(read_rope_parameters(config), config.head_dim)
    assert torch.equal(ours, theirs)
    assert our_factor == their_factor


def test_norm_multiplies_its_weight_in_float32_as_transformers_does() -> None:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=generator).to(torch.bfloat16)
    weight = (1 + 0.3 * torch.randn(256, generator=generator)).to(torch.bfloat16)
    theirs = GptOssRMSNorm(256, eps=1e-5)  # its weight kept in float32 (_keep_in_fp32_modules)
    ours, llamas = Float32WeightRMSNorm(256, eps=1e-5), RMSNorm(256, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        theirs.weight.copy_(weight.float())
        ours.weight.copy_(weight.float())
        ours.to(torch.bfloat16)
        llamas.weight.copy_(weight)
        assert torch.equal(ours(x), theirs(x))
        assert not torch.equal(llamas(x), theirs(x))  # Llama's casts before the weight multiplies
        residual = torch.randn(64, 256, generator=generator).to(torch.bfloat16)
        normed, total = ours(x, residual)
        assert torch.equal(total, x + residual) and torch.equal(normed, theirs(x + residual))


@pytest.mark.skipif(quant_library() is None, reason="no AVX2 CPU or C compiler here")
def test_int8_experts_take_the_experts_kernel_and_the_fused_stack(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Under --quantization int8 every linear and expert is quantized: each layer's experts take the
    fused experts kernel (gate/up biases and the clamped SwiGLU), and decode steps the fused stack
    (sinks, the router's and the experts' biases; tests/test_cpu_fused_decode_gpt_oss.py checks it)."""
    from batchlm.models.loader import load_model

    loaded = load_model(_write(tmp_path, WINDOW), torch.float32, CPU, progress=False, quantization="int8")
    experts = [layer.mlp.experts for layer in loaded.model.model.layers]
    assert all(e.quantized is not None and e.quantized.kernel is not None for e in experts)
    caches = make_kv_caches(loaded, 4)
    with caplog.at_level(logging.INFO, logger=fused_decode.__name__):
        assert fused_decode.build_fused_decode(loaded.model, caches, TorchAttentionBackend()) is not None
    assert "run the whole stack in one fused call" in caplog.text
