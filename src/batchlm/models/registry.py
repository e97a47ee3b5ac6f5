"""Which model class implements each HF architecture name (config.json's `architectures`).

Classes are imported on first use, so naming a family here costs nothing until a model needs it. A
new family is one model module plus one line below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchlm.models.base import CausalLM

# architecture -> "module:class"
MODEL_REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": "batchlm.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "batchlm.models.llama:MistralForCausalLM",
    "Mistral3ForConditionalGeneration": "batchlm.models.mistral3:Mistral3ForConditionalGeneration",
    "Ministral3ForCausalLM": "batchlm.models.ministral3:Ministral3ForCausalLM",
    "Qwen2ForCausalLM": "batchlm.models.llama:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "batchlm.models.qwen3:Qwen3ForCausalLM",
    "Gemma2ForCausalLM": "batchlm.models.gemma:Gemma2ForCausalLM",
    "Gemma3ForCausalLM": "batchlm.models.gemma:Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration": "batchlm.models.gemma:Gemma3ForConditionalGeneration",
    "Phi3ForCausalLM": "batchlm.models.phi3:Phi3ForCausalLM",
    "GraniteForCausalLM": "batchlm.models.granite:GraniteForCausalLM",
    "Olmo2ForCausalLM": "batchlm.models.olmo2:Olmo2ForCausalLM",
    "SmolLM3ForCausalLM": "batchlm.models.smollm3:SmolLM3ForCausalLM",
    "Glm4ForCausalLM": "batchlm.models.glm4:Glm4ForCausalLM",
    "Exaone4ForCausalLM": "batchlm.models.exaone4:Exaone4ForCausalLM",
    "SeedOssForCausalLM": "batchlm.models.llama:SeedOssForCausalLM",
    "Qwen3MoeForCausalLM": "batchlm.models.moe:Qwen3MoeForCausalLM",
    "MixtralForCausalLM": "batchlm.models.moe:MixtralForCausalLM",
    "GptOssForCausalLM": "batchlm.models.gpt_oss:GptOssForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_class(architecture: str) -> type[CausalLM]:
    """The class for an architecture name; ValueError naming it and listing ours if unsupported."""
    if architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; batchlm supports: {', '.join(supported_architectures())}"
        )
    module_name, _, class_name = MODEL_REGISTRY[architecture].partition(":")
    model_class: type[CausalLM] = getattr(importlib.import_module(module_name), class_name)
    return model_class


def architecture_of(config: Any) -> str:
    """The single architecture an HF config (object or config.json dict) declares."""
    names = (
        config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    )
    if not names:
        raise ValueError("config.json does not name the model architecture (no 'architectures' entry)")
    return str(names[0])
