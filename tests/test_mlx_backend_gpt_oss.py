"""gpt-oss on the MLX backend (mlx-lm's module) against transformers' GptOssForCausalLM, float32 on the
CPU, on a tiny random model whose sinks and biases are random, with a 4-token window that prompts of up
to 23 tokens pass and a SwiGLU limit its experts reach: logits, greedy tokens alone and side by side,
prefilled in chunks, and over a shared prefix. transformers 5's expert stacks, the SwiGLU limit,
untruncated YaRN and a config without layer_types are given to mlx-lm as it reads them; the released
MXFP4 experts load as mlx's mxfp4 quantized weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import batchlm.backends as backends
from batchlm.backends.mlx.families import mlx_lm_overrides, window_context_cap
from batchlm.backends.mlx.gpt_oss import yarn_periods
from batchlm.config import EngineConfig
from models_harness import hf_reference_model
from test_mlx_backend_families import batched_mlx_tokens, mlx_tokens, transformers_tokens

needs_mlx = pytest.mark.skipif(not backends.mlx_available(), reason="mlx and mlx-lm are not installed")
WINDOW = 4
# As tests/test_models_gpt_oss.py: a SwiGLU limit the tiny experts' values reach (mlx-lm's own 7.0
# moves the logits by about 0.04).
GPT_OSS: dict[str, Any] = {"sliding_window": WINDOW, "swiglu_limit": 0.1}
PROMPTS = [list(range(10, 33)), [5, 17, 42, 99], [*range(10, 33), 50], list(range(10, 33))]
# Measured: 2.7e-7 (float32); sinks dropped move them 6e-3, the limit left at 7.0 4e-2.
LOGITS_ATOL = 1e-5


def _logits_step_by_step(model: Any, prompt: list[int], new_tokens: list[int]) -> np.ndarray:
    """mlx-lm's logits of the prompt (one prefill) then of each given token decoded on its KV caches."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    rows = [np.array(model(mx.array([prompt]), cache=cache))[0]]
    rows += [np.array(model(mx.array([[token]]), cache=cache))[0] for token in new_tokens]
    return np.concatenate(rows)


@needs_mlx
def test_logits_match_transformers_past_the_window(tiny_model_dir: Callable[..., Path]) -> None:
    from batchlm.backends.mlx.loader import load_model

    model_dir = tiny_model_dir("gpt_oss", seed=3, **GPT_OSS)
    loaded = load_model(EngineConfig(model=str(model_dir), device="cpu"), model_dir)
    experts = loaded.model.layers[0].mlp.experts
    assert experts.activation._limit == 0.1 and np.abs(np.array(experts.gate_proj.bias)).sum() > 0
    assert np.abs(np.array(loaded.model.layers[0].self_attn.sinks)).sum() > 0
    prompt, continuation = PROMPTS[0], list(range(40, 52))  # 35 tokens, the window 4
    with torch.no_grad():
        expected = hf_reference_model(model_dir)(torch.tensor([prompt + continuation])).logits[0].numpy()
    got = _logits_step_by_step(loaded.model, prompt, continuation)
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOGITS_ATOL)


@needs_mlx
@pytest.mark.parametrize("prefill_chunk", [None, WINDOW + 2])
def test_greedy_tokens_match_transformers(
    tiny_model_dir: Callable[..., Path], prefill_chunk: int | None
) -> None:
    # Prompts past the window (in one chunk or several), a short one that decodes past it, and prompts
    # sharing a prefix longer than the window (prompt-cache lookups).
    model_dir = tiny_model_dir("gpt_oss", seed=3, **GPT_OSS)
    max_model_len, ours = mlx_tokens(model_dir, PROMPTS, 12, prefill_chunk)
    assert max_model_len > WINDOW
    assert ours == [transformers_tokens(model_dir, p, 12) for p in PROMPTS]


@needs_mlx
def test_sequences_decode_side_by_side(tiny_model_dir: Callable[..., Path]) -> None:
    # Batched rotating caches, left-padded prompts beside the sinks; an odd layer count.
    model_dir = tiny_model_dir("gpt_oss", seed=4, num_hidden_layers=3, **GPT_OSS)
    prompts = PROMPTS[:3]
    assert batched_mlx_tokens(model_dir, prompts, 10) == [
        transformers_tokens(model_dir, p, 10) for p in prompts
    ]


def _transformers_inv_freq(head_dim: int, rope: dict[str, Any]) -> np.ndarray:
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = GptOssConfig(head_dim=head_dim, rope_parameters=rope, max_position_embeddings=131072)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    return inv_freq.numpy()  # type: ignore[no-any-return]


# The released configs' YaRN (head_dim 64), whose unrounded range moves transformers' frequencies.
RELEASED_YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                 "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False}  # fmt: skip


@pytest.mark.parametrize("head_dim", [16, 64])
def test_untruncated_yarn_periods_are_transformers_inverse_frequencies(head_dim: int) -> None:
    periods = yarn_periods(head_dim, 150000.0, 32.0, 4096, 32.0, 1.0)
    np.testing.assert_allclose(
        1 / np.array(periods), _transformers_inv_freq(head_dim, RELEASED_YARN), rtol=1e-6
    )


@needs_mlx
def test_mlx_lms_yarn_gets_the_untruncated_frequencies(tiny_model_dir: Callable[..., Path]) -> None:
    from mlx_lm.models.rope_utils import initialize_rope

    from batchlm.backends.mlx.loader import load_model

    model_dir = tiny_model_dir("gpt_oss", seed=3, head_dim=64, **GPT_OSS)
    rope = json.loads((model_dir / "config.json").read_text())["rope_parameters"]
    assert rope["truncate"] is False
    loaded = load_model(EngineConfig(model=str(model_dir), device="cpu"), model_dir)
    expected = _transformers_inv_freq(64, rope)
    np.testing.assert_allclose(
        1 / np.array(loaded.model.layers[1].self_attn.rope._freqs), expected, rtol=1e-6
    )
    rounded = initialize_rope(64, 150000.0, False, rope)._freqs  # mlx-lm's own: the range rounded
    assert not np.allclose(1 / np.array(rounded), expected, rtol=1e-3)


def test_a_config_without_layer_types_gets_transformers_default() -> None:
    # mlx-lm's own default covers 2 * (layers // 2) layers: an odd count's last layer was skipped.
    assert mlx_lm_overrides({"model_type": "gpt_oss", "num_hidden_layers": 3}) == {
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]
    }
    stated = {"model_type": "gpt_oss", "layer_types": ["full_attention", "sliding_attention"]}
    assert mlx_lm_overrides(stated) == {}
    assert window_context_cap({**stated, "sliding_window": 128}) is None  # applied, not capped


@pytest.mark.parametrize("kind", ["sliding_attention", "full_attention"])
def test_layers_of_one_kind_are_refused_by_name(kind: str) -> None:
    # mlx-lm's gpt-oss builds its masks from its first window layer and its first full one.
    with pytest.raises(ValueError, match=r"do not mix window and full-attention layers.*--backend torch"):
        mlx_lm_overrides({"model_type": "gpt_oss", "layer_types": [kind] * 2})


@needs_mlx
@pytest.mark.parametrize("shards", [1, 2])
def test_released_mxfp4_experts_load_as_mlx_mxfp4(tmp_path: Path, shards: int) -> None:
    """The released layout (quantization_config mxfp4, `_blocks` / `_scales` pairs, bf16 biases) against
    transformers on the same experts dequantized by its own convert_moe_packed_tensors."""
    import mlx.core as mx

    from batchlm.backends.mlx.loader import load_model
    from test_models_gpt_oss_mxfp4 import _mxfp4_dir, _write_checkpoints

    tensors, dense_dir = _write_checkpoints(tmp_path)
    path = _mxfp4_dir(tmp_path / "mxfp4", dense_dir, tensors, shards)
    loaded = load_model(EngineConfig(model=str(path), device="cpu", dtype="float32"), path)
    gate = loaded.model.layers[0].mlp.experts.gate_proj
    assert loaded.quantized and gate.mode == "mxfp4" and gate.weight.dtype == mx.uint32
    prompt = PROMPTS[0]
    with torch.no_grad():
        expected = hf_reference_model(dense_dir)(torch.tensor([prompt])).logits[0].numpy()
    got = np.array(loaded.model(mx.array([prompt])))[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOGITS_ATOL)
