"""Configs of real model shapes for benchmarks with random weights (no downloads)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchlm.models.random_model import ARCHITECTURES

if TYPE_CHECKING:
    from batchlm import LLM

# gpt-oss-20b: 32 experts (4 a token) with biases, attention sinks, 128-token window layers
# alternating with full ones, YaRN (~21B parameters, ~3.6B active a token).
_GPT_OSS_20B: dict[str, Any] = {
    "model_type": "gpt_oss",
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 201088,
    "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "attention_bias": True,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
    },
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
}

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 2048,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
    "tiny-moe": {
        "model_type": "qwen3_moe",
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 2048,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
    # A Qwen3-MoE of ~110M parameters (~30M active) for CPU runs against transformers.
    "small-moe": {
        "model_type": "qwen3_moe",
        "hidden_size": 512,
        "intermediate_size": 1536,
        "moe_intermediate_size": 256,
        "num_experts": 32,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 8192,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rope_theta": 500000.0,
    },
    "llama-3.1-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rope_theta": 500000.0,
    },
    # Qwen3-30B-A3B's proportions at ~1B parameters (~0.2B active: 8 of 64 experts a token) and
    # SmolLM2's vocabulary: CPU serving of a quantized MoE GGUF against llama-server.
    "cpu-moe": {
        "model_type": "qwen3_moe",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "moe_intermediate_size": 384,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_hidden_layers": 12,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    # gpt-oss-20b: _GPT_OSS_20B above.
    "gpt-oss-20b": _GPT_OSS_20B,
    # gpt-oss-20b as released: its experts MXFP4 (random MXFP4 stacks with --dummy on a GPU).
    "gpt-oss-20b-mxfp4": {**_GPT_OSS_20B, "quantization_config": {"quant_method": "mxfp4"}},
    # gpt-oss-120b as released: 36 layers of 128 experts (4 a token), MXFP4 (~117B parameters, ~5.1B
    # active a token; ~65 GB with MXFP4 experts, ~234 GB dense bf16).
    "gpt-oss-120b": {
        **_GPT_OSS_20B,
        "num_local_experts": 128,
        "num_hidden_layers": 36,
        "layer_types": ["sliding_attention", "full_attention"] * 18,
        "quantization_config": {"quant_method": "mxfp4"},
    },
    # gpt-oss-20b's proportions (hidden = expert width, 64-wide heads over 8 KV heads, 32 experts of
    # which 4 a token, window layers alternating with full ones, sinks, biases) at ~1.35B parameters
    # (~0.29B active) and SmolLM2's vocabulary: CPU serving of an MXFP4 GGUF against llama-server.
    "cpu-gpt-oss": {
        **_GPT_OSS_20B,
        "hidden_size": 1024,
        "intermediate_size": 1024,
        "num_hidden_layers": 12,
        "num_attention_heads": 16,
        "vocab_size": 49152,
        "layer_types": ["sliding_attention", "full_attention"] * 6,
    },
    # Qwen3-0.6B: per-head q/k norms, tied embeddings.
    "qwen3-0.6b": {
        "model_type": "qwen3",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    # Phi-3-mini's proportions (fused q/k/v and gate/up in its files, 32,064-token vocabulary) at a
    # third of its width and layers. llama.cpp's converter wants a SentencePiece tokenizer for phi3,
    # so its GGUF comes from the tests' writer (tests/gguf_builder.py; BENCHMARKS.md has the command).
    "phi3-small": {
        "model_type": "phi3",
        "architecture": "Phi3ForCausalLM",
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 12,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
    },
    # google/gemma-3-1b-it's text shape: five 512-token window layers (local RoPE base 1e4) to one
    # global layer (base 1e6), 256-wide heads over one KV head.
    "gemma-3-1b": {
        "model_type": "gemma3_text",
        "architecture": "Gemma3ForCausalLM",
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "vocab_size": 262144,
        "max_position_embeddings": 32768,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "pad_token_id": 0,
    },
}


def hf_config_dict(shape: str) -> dict[str, Any]:
    params = dict(SHAPES[shape])
    params.setdefault("bos_token_id", 1)
    params.setdefault("eos_token_id", 2)
    params["architectures"] = [params.pop("architecture", None) or ARCHITECTURES[params["model_type"]]]
    params["torch_dtype"] = "bfloat16"
    return params


def write_config_only(shape: str, directory: Path) -> Path:
    """config.json + tokenizer files: enough for load_format='dummy' (weights made on the device)."""
    from batchlm.tokenizer.builder import build_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config_dict(shape), indent=2))
    if not (directory / "tokenizer.json").exists():
        build_tokenizer(directory)
    return directory


def dummy_llm(
    shape: str, num_requests: int, max_model_len: int, full_vocab_tokenizer: bool = False, **config: Any
) -> LLM:
    """An in-process engine of this shape with random weights made on the device (no prefix caching:
    the benchmarks' prompts are random), for `num_requests` running at once. full_vocab_tokenizer: the
    tokenizer padded to the model's vocabulary (grammar masks then cost what they cost with a real
    tokenizer of that size). `config`: more EngineConfig fields."""
    from batchlm import LLM

    model_dir = write_config_only(shape, Path(tempfile.gettempdir()) / f"batchlm-bench-{shape}")
    if full_vocab_tokenizer:
        from mlx_vs_mlx_lm_server import pad_tokenizer_vocab

        pad_tokenizer_vocab(model_dir / "tokenizer.json", SHAPES[shape]["vocab_size"])
    return LLM(
        model=str(model_dir),
        load_format="dummy",
        max_model_len=max_model_len,
        max_num_seqs=num_requests,
        enable_prefix_caching=False,
        **config,
    )


def write_random_weights(shape: str, directory: Path, seed: int = 0) -> Path:
    """A full random-weight safetensors checkpoint (CPU benchmarks, where transformers loads it too)."""
    from batchlm.models.random_model import write_random_model
    from batchlm.tokenizer.builder import build_tokenizer

    if (directory / "config.json").exists() and any(directory.glob("*.safetensors")):
        return directory
    params = {k: v for k, v in SHAPES[shape].items() if k not in ("model_type", "architecture")}
    write_random_model(directory, SHAPES[shape]["model_type"], params, seed=seed)
    build_tokenizer(directory)
    return directory
