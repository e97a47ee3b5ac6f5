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
from typing import Any, ClassVar

import torch
from torch import nn

from batchlm.attention.backend import AttentionBackend, AttentionMetadata
from batchlm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from batchlm.layers.norm import RMSNorm
from batchlm.layers.rotary import RotaryEmbedding, shared_ropes
from batchlm.models.base import CausalLM, StackedParam
from batchlm.models.hf_config import SLIDING, field_of, layer_types_of, text_config_of
from batchlm.models.llama import LLAMA_STACKED, BlockOptions, LlamaAttention, LlamaMLP
from batchlm.models.model_config import LayerSpec, ModelConfig, read_model_config
from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup


class Exaone4DecoderLayer(nn.Module):
    """Attend, norm, add; the same around the MLP (no norm before either)."""

    def __init__(
        self, config: ModelConfig, layer: LayerSpec, rope: RotaryEmbedding, tp: TensorParallelGroup
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer, rope, BlockOptions(qk_norm=True), tp)
        self.mlp = LlamaMLP(config, False, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        attended = self.self_attn(positions, hidden, kv_cache, meta, attn)
        hidden = hidden + self.post_attention_layernorm(attended)
        fed = self.mlp(hidden)
        residual: torch.Tensor = hidden + self.post_feedforward_layernorm(fed)
        return residual


class Exaone4Model(nn.Module):
    """Embedding, decoder layers, final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig, tp: TensorParallelGroup) -> None:
        super().__init__()
        ropes = shared_ropes([layer.rope for layer in config.layers], config.head_dim, config.max_model_len)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            Exaone4DecoderLayer(config, layer, rope, tp)
            for layer, rope in zip(config.layers, ropes, strict=True)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings [T, hidden] the first layer takes."""
        hidden: torch.Tensor = self.embed_tokens(input_ids)
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        hidden = self.embed(input_ids)  # [T, hidden]
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(positions, hidden, kv_cache, meta, attn)
        normed: torch.Tensor = self.norm(hidden)
        return normed


class Exaone4ForCausalLM(CausalLM):
    """EXAONE 4.0 (Exaone4ForCausalLM in config.json)."""

    model: Exaone4Model
    stacked_params: ClassVar[tuple[StackedParam, ...]] = LLAMA_STACKED

    def __init__(self, config: ModelConfig, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.config = config
        self.model = Exaone4Model(config, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

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
