"""Which model class implements each HF architecture name (config.json's `architectures`)."""

from __future__ import annotations

from typing import Any

from batchlm.models.base import CausalLM
from batchlm.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from batchlm.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM
from batchlm.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_class(architecture: str) -> type[CausalLM]:
    """The class for an architecture name; ValueError naming it and listing ours if unsupported."""
    if architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; batchlm supports: {', '.join(supported_architectures())}"
        )
    return MODEL_REGISTRY[architecture]


def architecture_of(config: Any) -> str:
    """The single architecture an HF config (object or config.json dict) declares."""
    names = (
        config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    )
    if not names:
        raise ValueError("config.json does not name the model architecture (no 'architectures' entry)")
    return str(names[0])
