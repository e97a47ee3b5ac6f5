"""Qwen3 decoder (dense): Llama-style blocks plus a per-head RMSNorm on queries and keys before RoPE."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from batchlm.attention.backend import AttentionBackend, AttentionMetadata
from batchlm.layers.activation import get_gated_activation
from batchlm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from batchlm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from batchlm.layers.norm import RMSNorm
from batchlm.layers.rotary import RotaryEmbedding, get_rope
from batchlm.models.base import CausalLM, StackedParam
from batchlm.models.hf_config import check_common_support, context_length, head_dim_of, num_kv_heads_of
from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup

QWEN3_STACKED: tuple[StackedParam, ...] = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


class Qwen3MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, config: Any, tp: TensorParallelGroup) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], False, tp)
        self.down_proj = RowParallelLinear(inter, hidden, False, tp)
        self.act_fn = get_gated_activation(getattr(config, "hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Qwen3Attention(nn.Module):
    """GQA self-attention; q and k are RMS-normalised per head (q_norm, k_norm) before RoPE."""

    def __init__(self, config: Any, rope: RotaryEmbedding, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        heads, kv_heads = config.num_attention_heads, num_kv_heads_of(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads, bias, tp)
        self.o_proj = RowParallelLinear(heads * self.head_dim, config.hidden_size, bias, tp)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.rotary_emb = rope
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        # hidden: [T, hidden] -> q [T, H, D], k/v [T, H_kv, D] -> out [T, hidden]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        out = attn.forward(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with the residual carried through the fused norms."""

    def __init__(self, config: Any, rope: RotaryEmbedding, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, rope, tp)
        self.mlp = Qwen3MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen3Model(nn.Module):
    """Embedding, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: Any, tp: TensorParallelGroup) -> None:
        super().__init__()
        rope = get_rope(config, head_dim_of(config), context_length(config))
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, rope, tp) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen3ForCausalLM(CausalLM):
    """Qwen3 with an LM head (tied to the embedding in the small checkpoints)."""

    stacked_params: ClassVar[tuple[StackedParam, ...]] = QWEN3_STACKED

    def __init__(self, config: Any, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        check_common_support(config)
        self.config = config
        self.model = Qwen3Model(config, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta, attn)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)
