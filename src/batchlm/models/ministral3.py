"""Ministral 3 (Ministral3ForCausalLM, and the text model of its Mistral3ForConditionalGeneration
checkpoints): Mistral whose queries are scaled by their position.

transformers multiplies each rotated query at position p by 1 + beta * log(1 + floor(p / L)) (Llama 4's
attention temperature), with beta = `llama_4_scaling_beta` and L = `original_max_position_embeddings`
of the config's `rope_parameters` (which also hold its YaRN scaling). One scalar a token commutes with
RoPE, so the queries are scaled before the attention backend rotates them: every backend (the Triton
one's RoPE fold into its KV write included) attends with them as they are. The factors come from the
step's positions tensor by tensor ops alone (no host sync), so a captured CUDA graph recomputes them at
each replay. The fused CPU decode stack, which computes the queries itself, does not run this family.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from batchlm.attention.backend import AttentionBackend, AttentionMetadata
from batchlm.layers.rope_scaling import read_rope_parameters
from batchlm.layers.rotary import RotaryEmbedding
from batchlm.models.hf_config import text_config_of
from batchlm.models.llama import BlockOptions, LlamaAttention, MistralForCausalLM
from batchlm.models.model_config import LayerSpec, ModelConfig
from batchlm.parallel.group import TensorParallelGroup

# The fields of the text config's rope_parameters the query scale reads: beta, then L.
SCALING_FIELDS = ("llama_4_scaling_beta", "original_max_position_embeddings")


@dataclass(frozen=True)
class QueryScaling:
    """Llama 4's attention temperature as Ministral 3 states it."""

    beta: float
    # Positions in blocks of this many tokens: the factor grows with each block.
    original_length: int

    def factors(self, positions: torch.Tensor) -> torch.Tensor:
        """Each token's query factor [T] (float32) from its position [T]."""
        # Negative positions (none are scheduled) would give log(0); clamped so a padded row stays finite.
        blocks = torch.div(positions, self.original_length, rounding_mode="floor").clamp(min=0)
        # log(1 + n), not log1p(n): the same float32 operations as transformers.
        return 1.0 + self.beta * torch.log(1.0 + blocks.float())


@dataclass(frozen=True)
class Ministral3ModelConfig(ModelConfig):
    """A ModelConfig with Ministral 3's query scaling."""

    query_scaling: QueryScaling = field(kw_only=True)


def read_ministral3_config(base: ModelConfig, hf_config: Any) -> Ministral3ModelConfig:
    """`base` (read as for Mistral) with the query scaling of the text config's rope_parameters;
    ValueError where they lack it or the positions the model sees would not be the tokens' own."""
    params = read_rope_parameters(text_config_of(hf_config))
    missing = [name for name in SCALING_FIELDS if params.get(name) is None]
    if missing:
        raise ValueError(
            f"this Ministral 3 config's rope_parameters lack {', '.join(missing)}, which transformers' "
            "Ministral 3 scales its queries by"
        )
    if params["rope_type"] == "longrope":
        # The runner offsets a long sequence's positions into LongRoPE's long rows.
        raise ValueError("unsupported LongRoPE scaling for Ministral 3: its query scale reads the position")
    beta, original_length = (params[name] for name in SCALING_FIELDS)
    scaling = QueryScaling(float(beta), int(original_length))
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    return Ministral3ModelConfig(**values, query_scaling=scaling)


def _query_scaling(config: ModelConfig) -> QueryScaling:
    if not isinstance(config, Ministral3ModelConfig):
        raise TypeError("Ministral 3 attention is built from the config read_ministral3_config returns")
    return config.query_scaling


class Ministral3Attention(LlamaAttention):
    """Llama's attention whose queries are scaled by their position before they are rotated."""

    def __init__(
        self,
        config: ModelConfig,
        layer: LayerSpec,
        rope: RotaryEmbedding,
        options: BlockOptions,
        tp: TensorParallelGroup,
    ) -> None:
        super().__init__(config, layer, rope, options, tp)
        self.query_scaling = _query_scaling(config)

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
        # Cast to the queries' dtype before the product, as transformers multiplies.
        factors = self.query_scaling.factors(positions).to(q.dtype)
        return super().attend(positions, q * factors[:, None, None], k, v, kv_cache, meta, attn)


def ministral3_options(options: BlockOptions) -> BlockOptions:
    """A Mistral block's options with Ministral 3's attention."""
    return replace(options, attention=Ministral3Attention)


class Ministral3ForCausalLM(MistralForCausalLM):
    """Ministral 3 (Ministral-3-3B/8B/14B's text model as its own checkpoint)."""

    @classmethod
    def read_config(cls, hf_config: Any) -> ModelConfig:
        return read_ministral3_config(super().read_config(hf_config), hf_config)

    @classmethod
    def block_options(cls, config: ModelConfig) -> BlockOptions:
        return ministral3_options(super().block_options(config))
