"""EXAONE 4.0 decoders (Exaone4ForCausalLM: EXAONE-4.0-1.2B and -32B).

What sets them apart from Llama: no norm before the attention or the MLP; each block norms the
attention's and the MLP's outputs before the residual add (as OLMo 2, but with Llama's RMSNorm);
queries and keys are RMS-normed per head before RoPE (as Qwen3); and a config with a sliding window
mixes window layers with global ones (`layer_types`, from `sliding_window_pattern`: three window
layers to a global one in the 32B model), where only the window layers rotate: the global layers
attend without RoPE (NoPE). Without a window every layer is global and rotates.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from batchlm.layers.norm import RMSNorm
from batchlm.layers.rotary import RotaryEmbedding
from batchlm.models.hf_config import SLIDING, field_of, layer_types_of, text_config_of
from batchlm.models.llama import BlockOptions, LlamaAttention
from batchlm.models.model_config import LayerSpec, ModelConfig, read_model_config
from batchlm.models.post_norm import PostNormForCausalLM
from batchlm.parallel.group import TensorParallelGroup


class Exaone4ForCausalLM(PostNormForCausalLM):
    """EXAONE 4.0 (Exaone4ForCausalLM in config.json)."""

    @staticmethod
    def build_attention(
        config: ModelConfig, layer: LayerSpec, rope: RotaryEmbedding, tp: TensorParallelGroup
    ) -> nn.Module:
        return LlamaAttention(config, layer, rope, BlockOptions(qk_norm=True), tp)

    @staticmethod
    def build_norm(width: int, eps: float) -> nn.Module:
        return RMSNorm(width, eps)

    @classmethod
    def read_config(cls, hf_config: Any) -> ModelConfig:
        config = read_model_config(hf_config)
        flags = rotating_layers(hf_config)
        layers = tuple(
            replace(layer, rotates=rotates) for layer, rotates in zip(config.layers, flags, strict=True)
        )
        return replace(config, layers=layers)


def rotating_layers(hf_config: Any) -> list[bool]:
    """True for each layer that applies RoPE: every layer of a config without a sliding window, else
    the window layers only (as transformers' EXAONE 4.0 decides it)."""
    text = text_config_of(hf_config)
    kinds = layer_types_of(text)
    if field_of(text, "sliding_window") is None:
        return [True] * len(kinds)
    return [kind == SLIDING for kind in kinds]
