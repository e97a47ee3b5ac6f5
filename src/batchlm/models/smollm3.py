"""SmolLM3 (SmolLM3ForCausalLM): Llama whose layers named by `no_rope_layers` (every fourth, in the
published models) attend without RoPE.

A layer's `no_rope_layers` entry is 1 where it rotates queries and keys, 0 where it does not (NoPE);
configs that predate the list state `no_rope_layer_interval` (a NoPE layer every that many). Each
layer's LayerSpec says whether it rotates; a NoPE layer hands its queries and keys to the attention
backend as they are.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from batchlm.models.hf_config import field_of, text_config_of
from batchlm.models.llama import LlamaForCausalLM
from batchlm.models.model_config import ModelConfig

# SmolLM3Config's default: every fourth layer leaves out RoPE.
NO_ROPE_LAYER_INTERVAL = 4


def rotating_layers(hf_config: Any, num_layers: int) -> list[bool]:
    """True for each layer that applies RoPE; ValueError for a list of another length."""
    text = text_config_of(hf_config)
    stated = field_of(text, "no_rope_layers")
    if stated is None:
        interval = int(field_of(text, "no_rope_layer_interval", NO_ROPE_LAYER_INTERVAL))
        return [(i + 1) % interval != 0 for i in range(num_layers)]
    if len(stated) != num_layers:
        raise ValueError(f"no_rope_layers names {len(stated)} layers but num_hidden_layers is {num_layers}")
    return [bool(flag) for flag in stated]


class SmolLM3ForCausalLM(LlamaForCausalLM):
    """SmolLM3 (SmolLM3-3B): the Llama block, RoPE left out on its NoPE layers."""

    @classmethod
    def read_config(cls, hf_config: Any) -> ModelConfig:
        config = super().read_config(hf_config)
        flags = rotating_layers(hf_config, config.num_layers)
        layers = tuple(
            replace(layer, rotates=rotates) for layer, rotates in zip(config.layers, flags, strict=True)
        )
        return replace(config, layers=layers)
