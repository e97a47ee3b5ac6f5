"""Llama-family decoder (Llama 2/3/3.x, SmolLM2, TinyLlama), also serving Mistral, Qwen2 and Seed-OSS."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from batchlm.attention.backend import AttentionBackend, AttentionMetadata
from batchlm.layers.activation import SiluAndMul, get_gated_activation
from batchlm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from batchlm.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    check_shape,
)
from batchlm.layers.norm import RMSNorm
from batchlm.layers.quantization.base import LoadedWeight, as_dense
from batchlm.layers.rotary import RotaryEmbedding, shared_ropes
from batchlm.models.base import CausalLM, StackedParam
from batchlm.models.hf_config import field_of, text_config_of
from batchlm.models.model_config import LayerSpec, ModelConfig, read_model_config
from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup

logger = logging.getLogger(__name__)

LLAMA_STACKED: tuple[StackedParam, ...] = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


@dataclass(frozen=True)
class BlockOptions:
    """What differs between the Llama-style families inside a decoder block."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Qwen3: RMSNorm over each query and key head before RoPE.
    qk_norm: bool = False
    # The norm those heads get, built as head_norm(head_dim, eps) (Gemma 3: its (1 + w) float32 norm).
    head_norm: Callable[[int, float], nn.Module] = RMSNorm
    # The block's and the final norms, built as norm(hidden_size, eps) (gpt-oss: its weight multiplies
    # in float32).
    norm: Callable[[int, float], RMSNorm] = RMSNorm
    # The block, built as LlamaDecoderLayer is (Granite: scaled outputs; GLM-4: normed ones), and its
    # attention, built as LlamaAttention is (Ministral 3: queries scaled by position); None: Llama's.
    layer: type[LlamaDecoderLayer] | None = None
    attention: type[LlamaAttention] | None = None


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig, bias: bool, tp: TensorParallelGroup) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        if inter % tp.size:
            # Checked here so that the error names the config field, not a layer's "output size".
            raise ValueError(
                f"intermediate_size ({inter}) is not divisible by the tensor-parallel size {tp.size}"
            )
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias, tp)
        self.down_proj = RowParallelLinear(inter, hidden, bias, tp)
        self.act_fn = get_gated_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 * intermediate]
        if isinstance(self.act_fn, SiluAndMul):
            # One row on a GPU: the down projection makes the activation itself, one launch fewer.
            fused = self.down_proj.forward_silu_gated(gate_up)
            if fused is not None:
                return fused
        out: torch.Tensor = self.down_proj(self.act_fn(gate_up))  # [T, hidden]
        return out


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE; q/k/v fused into one matmul (optionally q/k-normed)."""

    def __init__(
        self,
        config: ModelConfig,
        layer: LayerSpec,
        rope: RotaryEmbedding,
        options: BlockOptions,
        tp: TensorParallelGroup,
    ) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        heads, kv_heads = config.num_heads, config.num_kv_heads
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, heads, kv_heads, options.qkv_bias, tp
        )
        self.o_proj = RowParallelLinear(heads * self.head_dim, config.hidden_size, options.o_bias, tp)
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if options.qk_norm:
            self.q_norm = options.head_norm(self.head_dim, config.rms_norm_eps)
            self.k_norm = options.head_norm(self.head_dim, config.rms_norm_eps)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.rotary_emb = rope
        self.rotates = layer.rotates
        self.spec = layer.attention
        # This rank's query heads' sink logits (checkpoint name `sinks`), where the layer has them: float32
        # whatever the model's dtype (the checkpoint's values exactly; the kernels take float32).
        self.sinks: nn.Parameter | None = None
        if self.spec.sinks:
            self.sinks = nn.Parameter(torch.zeros(self.num_heads, dtype=torch.float32), requires_grad=False)

    def load_weight(
        self, name: str, param_name: str, loaded: LoadedWeight, shard: str | int | None = None
    ) -> None:
        """The attention's own parameter, `sinks`: this rank's query heads' share of every head's."""
        if param_name != "sinks" or self.sinks is None:
            raise ValueError(f"unexpected checkpoint tensor {name!r}: the attention has no {param_name}")
        check_shape(name, (self.qkv_proj.total_num_heads,), loaded.shape)
        start = self.qkv_proj.tp.rank * self.num_heads
        with torch.no_grad():
            self.sinks.copy_(as_dense(loaded, self.sinks.dtype).narrow(0, start, self.num_heads))

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
        q, k = self.query_key_heads(q, k)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = self.attend(positions, q, k, v, kv_cache, meta, attn)
        projected: torch.Tensor = self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))
        return projected

    def query_key_heads(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projections q [T, H * D] and k [T, H_kv * D] as heads, normed per head where the family
        norms them (Qwen3); a family that norms the whole projection (OLMo 2) norms before the view."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k

    def attend(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        """Attention of the unrotated q [T, H, D] over k and v [T, H_kv, D]: rotated by the backend
        (which may fold RoPE into its cache write), or as they are on a layer without RoPE."""
        if not self.rotates:
            return attn.forward(q, k, v, kv_cache, meta, self.spec, self.sinks)
        return attn.forward_rotating(
            positions, self.rotary_emb, q, k, v, kv_cache, meta, self.spec, self.sinks
        )


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; the residual stream is carried through the fused norms."""

    def __init__(
        self,
        config: ModelConfig,
        layer: LayerSpec,
        rope: RotaryEmbedding,
        options: BlockOptions,
        tp: TensorParallelGroup,
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = (options.attention or LlamaAttention)(config, layer, rope, options, tp)
        # `mlp` replaces the dense MLP (mixture-of-experts families).
        self.mlp = mlp if mlp is not None else LlamaMLP(config, options.mlp_bias, tp)
        self.input_layernorm = options.norm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = options.norm(config.hidden_size, config.rms_norm_eps)

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
        hidden = self.attention_out(self.self_attn(positions, hidden, kv_cache, meta, attn))
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp_out(self.mlp(hidden)), residual

    def attention_out(self, attended: torch.Tensor) -> torch.Tensor:
        """What the attention adds to the residual stream (a family may scale or norm it first)."""
        return attended

    def mlp_out(self, fed: torch.Tensor) -> torch.Tensor:
        """What the MLP adds to the residual stream (a family may scale or norm it first)."""
        return fed


class LlamaModel(nn.Module):
    """Embedding, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(
        self,
        config: ModelConfig,
        options: BlockOptions,
        tp: TensorParallelGroup,
        mlp_of_layer: Callable[[int], nn.Module | None] | None = None,
    ) -> None:
        super().__init__()
        ropes = shared_ropes([layer.rope for layer in config.layers], config.head_dim, config.max_model_len)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            (options.layer or LlamaDecoderLayer)(
                config, layer, rope, options, tp, mlp_of_layer(i) if mlp_of_layer else None
            )
            for i, (layer, rope) in enumerate(zip(config.layers, ropes, strict=True))
        )
        self.norm = options.norm(config.hidden_size, config.rms_norm_eps)

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
        hidden: torch.Tensor = self.embed(input_ids)  # [T, hidden]
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, attn)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(CausalLM):
    """Llama with an LM head (tied to the embedding when the config says so)."""

    model: LlamaModel
    stacked_params: ClassVar[tuple[StackedParam, ...]] = LLAMA_STACKED

    def __init__(self, config: ModelConfig, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.config = config
        self.model = self.build_model(config, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    @classmethod
    def read_config(cls, hf_config: Any) -> ModelConfig:
        # transformers' Llama (and Seed-OSS, which is its model) attends to the whole context even
        # where its config states a sliding_window (or layer_types); the families built on this class
        # (Mistral, Qwen2, Phi-3...) honour theirs.
        windows = cls not in (LlamaForCausalLM, SeedOssForCausalLM)
        if not windows and field_of(text_config_of(hf_config), "sliding_window"):
            logger.warning(
                "the config's sliding_window is not used by %s models: every layer attends to its whole "
                "context",
                cls.__name__.removesuffix("ForCausalLM"),
            )
        return read_model_config(hf_config, windows=windows)

    def build_model(self, config: ModelConfig, tp: TensorParallelGroup) -> LlamaModel:
        """The decoder stack (embedding, layers, final norm) under HF's `model.` prefix."""
        return LlamaModel(config, self.block_options(config), tp)

    @classmethod
    def block_options(cls, config: ModelConfig) -> BlockOptions:
        """Biases (and q/k norms) of this family's decoder blocks."""
        return BlockOptions(config.attention_bias, config.attention_bias, config.mlp_bias)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: the Llama architecture, every layer attending within the config's sliding window."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2/2.5: Llama with biases on the q, k and v projections."""

    @classmethod
    def block_options(cls, config: ModelConfig) -> BlockOptions:
        return BlockOptions(qkv_bias=True)


class SeedOssForCausalLM(LlamaForCausalLM):
    """Seed-OSS (Seed-OSS-36B): Llama whose q/k/v biases (attention_bias, on in its configs) and o_proj
    bias (attention_out_bias) are stated apart."""

    @classmethod
    def block_options(cls, config: ModelConfig) -> BlockOptions:
        return BlockOptions(config.attention_bias, config.attention_out_bias, config.mlp_bias)
