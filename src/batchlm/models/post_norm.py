"""Decoders whose blocks norm the attention's and the MLP's outputs before adding them, each block
returning the residual stream whole: OLMo 2 and EXAONE 4.0 (attend, norm, add; the same around the MLP:
a family names its attention and its norm), and Gemma 2/3, whose blocks norm their inputs too (their
stack is PostNormModel's, with their own blocks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from batchlm.attention.backend import AttentionBackend, AttentionMetadata
from batchlm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from batchlm.layers.rotary import RotaryEmbedding, shared_ropes
from batchlm.models.base import CausalLM, StackedParam
from batchlm.models.llama import LLAMA_STACKED, LlamaMLP
from batchlm.models.model_config import LayerSpec, ModelConfig
from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup

# Builds a layer's attention; builds a norm of a width with an epsilon; builds a layer's block.
AttentionBuilder = Callable[[ModelConfig, LayerSpec, RotaryEmbedding, TensorParallelGroup], nn.Module]
NormBuilder = Callable[[int, float], nn.Module]
BlockBuilder = Callable[[LayerSpec, RotaryEmbedding], nn.Module]


class PostNormDecoderLayer(nn.Module):
    """Attend, norm, add; the same around the MLP (no norm before either)."""

    def __init__(
        self, config: ModelConfig, attention: nn.Module, norm: NormBuilder, tp: TensorParallelGroup
    ) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = LlamaMLP(config, False, tp)
        self.post_attention_layernorm = norm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = norm(config.hidden_size, config.rms_norm_eps)

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


class PostNormModel(nn.Module):
    """Embedding, decoder layers, final norm (HF's `model.` prefix)."""

    def __init__(
        self, config: ModelConfig, block: BlockBuilder, norm: NormBuilder, tp: TensorParallelGroup
    ) -> None:
        super().__init__()
        ropes = shared_ropes([layer.rope for layer in config.layers], config.head_dim, config.max_model_len)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            block(layer, rope) for layer, rope in zip(config.layers, ropes, strict=True)
        )
        self.norm = norm(config.hidden_size, config.rms_norm_eps)

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


class PostNormForCausalLM(CausalLM):
    """A post-norm decoder with an LM head (tied to the embedding when the config says so)."""

    model: PostNormModel
    stacked_params: ClassVar[tuple[StackedParam, ...]] = LLAMA_STACKED

    def __init__(self, config: ModelConfig, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.config = config

        def block(layer: LayerSpec, rope: RotaryEmbedding) -> nn.Module:
            return PostNormDecoderLayer(
                config, self.build_attention(config, layer, rope, tp), self.build_norm, tp
            )

        self.model = PostNormModel(config, block, self.build_norm, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    @staticmethod
    def build_attention(
        config: ModelConfig, layer: LayerSpec, rope: RotaryEmbedding, tp: TensorParallelGroup
    ) -> nn.Module:
        """The family's attention of one layer."""
        raise NotImplementedError

    @staticmethod
    def build_norm(width: int, eps: float) -> nn.Module:
        """The family's RMSNorm of the blocks' outputs and the final hidden state."""
        raise NotImplementedError
