"""Write random-weight Hugging Face checkpoints of a given architecture (tests, demo, benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Small shapes that keep CPU tests fast while exercising GQA (4 query heads over 2 KV heads).
TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Expert fields of the tiny mixture-of-experts models (8 experts, 2 per token).
TINY_MOE_CONFIG: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 48,
        "norm_topk_prob": True,
    },
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    # Experts of intermediate size 64: whole 32-value blocks, so they quantize under --quantization int8;
    # the released models' context (YaRN stretches 4096 positions 32 times).
    "gpt_oss": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 131072,
    },
}

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "granite": "GraniteForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "exaone4": "Exaone4ForCausalLM",
    "ministral3": "Ministral3ForCausalLM",
    "seed_oss": "SeedOssForCausalLM",
    "mistral3": "Mistral3ForConditionalGeneration",
}

# Multimodal model types: the tiny sizes describe their text model (of this model_type, unless the
# overrides' "text_model_type" names another: "ministral3" in a Mistral 3), which sits beside a tiny
# vision tower whose weights batchlm skips.
TINY_MULTIMODAL: dict[str, tuple[str, dict[str, Any]]] = {
    "mistral3": (
        "mistral",
        {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "head_dim": 16, "image_size": 28, "patch_size": 14},
    ),
}  # fmt: skip


def write_random_model(
    path: str | Path,
    model_type: str = "llama",
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Write config.json + safetensors for a random-weight model and return the directory.

    Weights come from transformers' own initialisation (seeded), so the checkpoint is exactly what
    transformers would load. Tokenizer files are not written (see batchlm.tokenizer.builder).
    """
    import torch

    if model_type not in ARCHITECTURES:
        raise ValueError(f"unknown model_type {model_type!r}; choose from {sorted(ARCHITECTURES)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    params = {**TINY_CONFIG, **TINY_MOE_CONFIG.get(model_type, {}), **(overrides or {})}
    config = _hf_config(model_type, params)
    config.architectures = [ARCHITECTURES[model_type]]
    torch.manual_seed(seed)
    model = _hf_model(model_type, config).float()
    # Random init leaves some weights tiny; scale so greedy decoding is not a constant argmax.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif param.dim() == 1 or name.endswith("_bias"):
                # Biases and gpt-oss's sinks (which transformers may start at zero) made to count.
                param.normal_(0.0, 0.1)
            elif name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                # A router at the init scale gives near-equal scores, where rounding picks the experts.
                param.normal_(0.0, 0.5)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    # Keep generation_config honest: eos from the config.
    gen_path = out / "generation_config.json"
    if gen_path.exists():
        gen = json.loads(gen_path.read_text())
        gen.setdefault("eos_token_id", config.get_text_config().eos_token_id)
        gen_path.write_text(json.dumps(gen, indent=2))
    return out


def _hf_config(model_type: str, params: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    if model_type not in TINY_MULTIMODAL:
        return AutoConfig.for_model(model_type, **params)
    default_text_type, vision = TINY_MULTIMODAL[model_type]
    params = dict(params)
    text_type = params.pop("text_model_type", default_text_type)
    # Tying is stated on both configs: transformers reads the outer one, the text model the inner one.
    tied = bool(params.get("tie_word_embeddings", False))
    text = {"model_type": text_type, **params}
    return AutoConfig.for_model(model_type, text_config=text, vision_config=vision, tie_word_embeddings=tied)


def _hf_model(model_type: str, config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if model_type in TINY_MULTIMODAL:
        return AutoModelForImageTextToText.from_config(config)
    return AutoModelForCausalLM.from_config(config)
