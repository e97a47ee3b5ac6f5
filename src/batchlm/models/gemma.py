"""Gemma 2 and Gemma 3 (text) decoders.

What sets them apart from Llama: RMSNorm scales by (1 + weight) in float32; the embedding is scaled
by sqrt(hidden); each block norms the attention and MLP outputs again before the residual add; GeLU
(tanh) gating; every other layer (Gemma 2) or five of six (Gemma 3) attends within a sliding window.
Gemma 2 soft-caps attention scores and final logits (Gemma 3 only its logits, where stated); Gemma 3
norms each query and key head and gives its window layers their own RoPE base. All of it comes from
the per-layer specs in ModelConfig.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from batchlm.attention.backend import AttentionBackend, AttentionMetadata
from batchlm.layers.embedding import ParallelLMHead
from batchlm.layers.quantization.base import LoadedWeight
from batchlm.layers.rotary import RotaryEmbedding
from batchlm.models.base import CausalLM, StackedParam
from batchlm.models.llama import LLAMA_STACKED, BlockOptions, LlamaAttention, LlamaMLP
from batchlm.models.model_config import LayerSpec, ModelConfig, read_model_config
from batchlm.models.multimodal_text import text_model_tensors
from batchlm.models.post_norm import PostNormModel
from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup


class GemmaRMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (1 + weight), all in float32, then cast back (as HF does)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class GemmaDecoderLayer(nn.Module):
    """Norm, attend, norm again, add; the same around the MLP."""

    def __init__(
        self,
        config: ModelConfig,
        layer: LayerSpec,
        rope: RotaryEmbedding,
        qk_norm: bool,
        tp: TensorParallelGroup,
    ) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        options = BlockOptions(
            config.attention_bias, config.attention_bias, qk_norm=qk_norm, head_norm=GemmaRMSNorm
        )
        self.self_attn = LlamaAttention(config, layer, rope, options, tp)
        self.mlp = LlamaMLP(config, False, tp)
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        attended = self.self_attn(positions, self.input_layernorm(hidden), kv_cache, meta, attn)
        hidden = hidden + self.post_attention_layernorm(attended)
        fed = self.mlp(self.pre_feedforward_layernorm(hidden))
        residual: torch.Tensor = hidden + self.post_feedforward_layernorm(fed)
        return residual


class GemmaModel(PostNormModel):
    """Scaled embedding, decoder layers, final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig, qk_norm: bool, tp: TensorParallelGroup) -> None:
        def block(layer: LayerSpec, rope: RotaryEmbedding) -> nn.Module:
            return GemmaDecoderLayer(config, layer, rope, qk_norm, tp)

        super().__init__(config, block, GemmaRMSNorm, tp)
        self.embed_scale = config.hidden_size**0.5

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The scaled token embeddings [T, hidden] the first layer takes."""
        hidden: torch.Tensor = self.embed_tokens(input_ids)
        # HF rounds the scale to the activation dtype before multiplying (a host-side rounding here,
        # so a CUDA-graph capture sees a plain scalar).
        return hidden * float(torch.tensor(self.embed_scale, dtype=hidden.dtype))


class Gemma2ForCausalLM(CausalLM):
    """Gemma 2: soft-capped attention scores and final logits, alternating window and global layers."""

    model: GemmaModel
    stacked_params: ClassVar[tuple[StackedParam, ...]] = LLAMA_STACKED
    qk_norm: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.config = config
        self.model = GemmaModel(config, self.qk_norm, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden).float()  # capped in float32
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text: q/k norms per head; window layers use the local RoPE base."""

    qk_norm: ClassVar[bool] = True

    @classmethod
    def read_config(cls, hf_config: Any) -> ModelConfig:
        # Gemma 3 configs carry attn_logit_softcapping, but the model never caps its scores
        # (transformers keeps the field and does not apply it).
        config = read_model_config(hf_config)
        layers = tuple(
            replace(layer, attention=replace(layer.attention, logit_softcap=None)) for layer in config.layers
        )
        return replace(config, layers=layers)


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The text model of a multimodal Gemma 3 checkpoint (its config nests `text_config`); the vision
    tower and projector tensors are skipped, so it serves text prompts."""

    def checkpoint_tensors(
        self, weights: Iterable[tuple[str, LoadedWeight]]
    ) -> Iterable[tuple[str, LoadedWeight]]:
        return text_model_tensors(weights)
