"""IBM Granite 3.x dense decoders (GraniteForCausalLM): the Llama block and four scalars of the config.

transformers multiplies the token embeddings by `embedding_multiplier`, each block's attention and MLP
outputs by `residual_multiplier` before they join the residual stream, scales the attention scores by
`attention_multiplier` (in place of 1/sqrt(head_dim)) and divides the logits by `logits_scaling`. Each
is applied here where transformers applies it, as its own operation in the activations' dtype, so the
roundings (and so greedy tokens) are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from batchlm.layers.rotary import RotaryEmbedding
from batchlm.models.hf_config import field_of, text_config_of
from batchlm.models.llama import BlockOptions, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from batchlm.models.model_config import LayerSpec, ModelConfig
from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup


@dataclass(frozen=True)
class GraniteScales:
    """The config's multipliers (the attention one lives in each layer's AttentionSpec)."""

    embedding: float
    residual: float
    # The logits are divided by it.
    logits: float


@dataclass(frozen=True)
class GraniteModelConfig(ModelConfig):
    """A ModelConfig with Granite's multipliers."""

    scales: GraniteScales = field(kw_only=True)


def read_granite_config(base: ModelConfig, hf_config: Any) -> GraniteModelConfig:
    """`base` (read as for Llama) with Granite's multipliers; attention_multiplier becomes every
    layer's attention scale."""
    text = text_config_of(hf_config)
    attention_scale = float(field_of(text, "attention_multiplier", 1.0))
    layers = tuple(
        replace(layer, attention=replace(layer.attention, scale=attention_scale)) for layer in base.layers
    )
    scales = GraniteScales(
        embedding=float(field_of(text, "embedding_multiplier", 1.0)),
        residual=float(field_of(text, "residual_multiplier", 1.0)),
        logits=float(field_of(text, "logits_scaling", 1.0)),
    )
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    return GraniteModelConfig(**{**values, "layers": layers}, scales=scales)


def _scales(config: ModelConfig) -> GraniteScales:
    if not isinstance(config, GraniteModelConfig):
        raise TypeError("Granite models are built from the config GraniteForCausalLM.read_config returns")
    return config.scales


class GraniteDecoderLayer(LlamaDecoderLayer):
    """The Llama block whose attention and MLP outputs are scaled before the residual add.

    As in LlamaDecoderLayer, the MLP output is returned un-added: the next layer's input norm (or the
    final norm) adds it to the residual stream, so it is returned already scaled."""

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
        self.residual_multiplier = _scales(config).residual

    def attention_out(self, attended: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = attended * self.residual_multiplier
        return out

    def mlp_out(self, fed: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = fed * self.residual_multiplier
        return out


class GraniteModel(LlamaModel):
    """Llama's decoder stack with the scaled embedding and Granite's blocks."""

    def __init__(self, config: ModelConfig, options: BlockOptions, tp: TensorParallelGroup) -> None:
        super().__init__(config, options, tp)
        self.embedding_multiplier = _scales(config).embedding

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # A Python scalar, as transformers multiplies by it (not rounded to the activation dtype first).
        return super().embed(input_ids) * self.embedding_multiplier


class GraniteForCausalLM(LlamaForCausalLM):
    """Granite 3.x dense (granite-3.3-8b-instruct and its kin)."""

    def __init__(self, config: ModelConfig, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__(config, tp)
        self.logits_scaling = _scales(config).logits

    @classmethod
    def read_config(cls, hf_config: Any) -> ModelConfig:
        return read_granite_config(super().read_config(hf_config), hf_config)

    @classmethod
    def block_options(cls, config: ModelConfig) -> BlockOptions:
        return replace(super().block_options(config), layer=GraniteDecoderLayer)

    def build_model(self, config: ModelConfig, tp: TensorParallelGroup) -> LlamaModel:
        return GraniteModel(config, self.block_options(config), tp)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Divided in the model's dtype, as transformers divides them.
        return self.lm_head.compute_logits(hidden) / self.logits_scaling
