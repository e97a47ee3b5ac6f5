"""GLM-4 decoders (Glm4ForCausalLM: GLM-4-9B-0414, GLM-4-32B-0414 and the GLM-Z1 models).

What sets them apart from Llama: each block norms the attention's and the MLP's outputs too, before
their residual adds (four RMSNorms a block, placed as Gemma 2's, under names of their own); q, k and v
carry biases; checkpoints fuse gate and up into `gate_up_proj` (split at load, as Phi-3's); and RoPE
turns only the first `partial_rotary_factor` (0.5) of each head, pairing dimensions (2i, 2i + 1)
where rotate-half pairs (i, i + r/2).

That pairing is settled at load: each q and k head's rotating rows are reordered so that pair
(2i, 2i + 1) lands on rows (i, i + r/2), where every RoPE path of batchlm turns it (torch, the GPU
kernels and Triton's fold into the KV write, the CPU kernels and the fused decode stack). A head's
attention scores sum q * k over its dimensions, so reordering q's and k's alike changes nothing but
the order of that sum; values are untouched. The KV cache holds the keys in the reordered layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from batchlm.layers.norm import RMSNorm
from batchlm.layers.quantization.base import LoadedWeight, select_rows
from batchlm.layers.rotary import RotaryEmbedding
from batchlm.models.llama import BlockOptions, LlamaDecoderLayer, LlamaForCausalLM
from batchlm.models.model_config import LayerSpec, ModelConfig, read_model_config
from batchlm.models.phi3 import split_fused_tensors
from batchlm.parallel.group import TensorParallelGroup


class Glm4DecoderLayer(LlamaDecoderLayer):
    """Llama's block with the attention's and the MLP's outputs normed before they join the residual
    stream. As in LlamaDecoderLayer, the MLP output is returned un-added (normed already): the next
    layer's input norm (or the final norm) adds it."""

    def __init__(
        self,
        config: ModelConfig,
        layer: LayerSpec,
        rope: RotaryEmbedding,
        options: BlockOptions,
        tp: TensorParallelGroup,
        mlp: nn.Module | None,
    ) -> None:
        super().__init__(config, layer, rope, options, tp, mlp)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attention_out(self, attended: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.post_self_attn_layernorm(attended)
        return out

    def mlp_out(self, fed: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.post_mlp_layernorm(fed)
        return out


class Glm4ForCausalLM(LlamaForCausalLM):
    """GLM-4-0414 and GLM-Z1 (Glm4ForCausalLM in config.json)."""

    @classmethod
    def read_config(cls, hf_config: Any) -> ModelConfig:
        # transformers' GLM-4 attends to the whole context whatever a config says of windows.
        return read_model_config(hf_config, windows=False)

    @classmethod
    def block_options(cls, config: ModelConfig) -> BlockOptions:
        # attention_bias covers q, k and v only: o_proj and the MLP have none.
        return BlockOptions(qkv_bias=config.attention_bias, layer=Glm4DecoderLayer)

    def checkpoint_tensors(
        self, weights: Iterable[tuple[str, LoadedWeight]]
    ) -> Iterable[tuple[str, LoadedWeight]]:
        return pairs_as_halves(split_fused_tensors(weights, self.config), self.config)


def rotary_dim_of(config: ModelConfig) -> int:
    """The width every layer rotates (GLM-4's layers share one RoPE)."""
    widths = {layer.rope.rotary_dim for layer in config.layers}
    if len(widths) != 1:
        raise ValueError(f"GLM-4 layers rotating different widths: {sorted(widths)}")
    return widths.pop()


def halves_order(heads: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Row indices [heads * head_dim] taking each head's interleaved rotary pairs to rotate-half's
    layout: new row i < r/2 is old row 2i, new row r/2 + i is old row 2i + 1; the rows past r stay."""
    within = torch.cat(
        (
            torch.arange(0, rotary_dim, 2),
            torch.arange(1, rotary_dim, 2),
            torch.arange(rotary_dim, head_dim),
        )
    )
    return (torch.arange(heads).unsqueeze(1) * head_dim + within).reshape(-1)


def pairs_as_halves(
    weights: Iterable[tuple[str, LoadedWeight]], config: ModelConfig
) -> Iterator[tuple[str, LoadedWeight]]:
    """The q and k projections (weights and biases) with their rotating rows reordered for
    rotate-half RoPE (halves_order); every other tensor as it is."""
    rotary_dim = rotary_dim_of(config)
    orders = {
        "q_proj": halves_order(config.num_heads, config.head_dim, rotary_dim),
        "k_proj": halves_order(config.num_kv_heads, config.head_dim, rotary_dim),
    }
    for name, tensor in weights:
        module = name.rpartition(".")[0].rpartition(".")[2]
        order = orders.get(module)
        yield name, tensor if order is None else _reordered(name, tensor, order)


def _reordered(name: str, tensor: LoadedWeight, order: torch.Tensor) -> LoadedWeight:
    if tensor.shape[0] != order.shape[0]:
        raise ValueError(f"{name} has {tensor.shape[0]} rows; the config needs {order.shape[0]}")
    return select_rows(tensor, order)
