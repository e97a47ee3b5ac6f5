"""The model's configuration as batchlm uses it: one frozen dataclass, built once from the HF config.

Model and layer code read only this (never the HF config), so a family's quirks are decided here, in
one reader, and each layer gets its own attention spec (scale, sliding window, soft-cap) and RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchlm.attention.backend import AttentionSpec
from batchlm.layers.rope_scaling import read_rope_parameters
from batchlm.layers.rotary import RopeSpec
from batchlm.models.hf_config import (
    FULL,
    SLIDING,
    activation_of,
    check_common_support,
    context_length,
    field_of,
    head_dim_of,
    layer_types_of,
    num_kv_heads_of,
    sliding_window_of,
    text_config_of,
)

# The families whose transformers model rotates only partial_rotary_factor of each head; the others
# turn every dimension whatever the config says, so a smaller factor there is refused.
PARTIAL_ROTARY_ARCHITECTURES = frozenset({"Phi3ForCausalLM", "Glm4ForCausalLM"})


@dataclass(frozen=True)
class LayerSpec:
    """What differs between decoder layers: how the layer attends and how it rotates q and k."""

    attention: AttentionSpec
    rope: RopeSpec
    # False: the layer attends without RoPE (SmolLM3's NoPE layers); `rope` then only sizes the
    # no-rotation table the fused CPU decode stack gives the layer.
    rotates: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of a decoder-only model (the text model of a multimodal config)."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    # Longest prompt + output: the RoPE-scaled position limit (never capped by a sliding window).
    max_model_len: int
    rms_norm_eps: float
    hidden_act: str
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    initializer_range: float
    layers: tuple[LayerSpec, ...]
    # Logits become cap * tanh(logits / cap) (Gemma 2); None: no cap.
    final_logit_softcap: float | None = None
    # A bias on the attention's output projection where the config states it apart from q/k/v's
    # (Seed-OSS's attention_out_bias); the other families read attention_bias for it.
    attention_out_bias: bool = False

    @property
    def sliding_window(self) -> int | None:
        """The widest window any layer uses (None when every layer attends to its whole context)."""
        windows = [layer.attention.sliding_window for layer in self.layers if layer.attention.sliding_window]
        return max(windows) if windows else None


def read_model_config(hf_config: Any, architecture: str | None = None, windows: bool = True) -> ModelConfig:
    """The ModelConfig of an HF config (transformers object or ConfigView); ValueError naming what
    batchlm does not implement. windows=False: every layer attends to its whole context, whatever the
    config says of sliding windows (a family whose transformers model has none)."""
    outer_architecture = architecture or str(field_of(hf_config, "architectures", ["?"])[0])
    text = text_config_of(hf_config)
    check_common_support(text)
    head_dim = head_dim_of(text)
    num_layers = int(text.num_hidden_layers)
    layer_types = layer_types_of(text) if windows else [FULL] * num_layers
    partial_rotary = outer_architecture in PARTIAL_ROTARY_ARCHITECTURES
    return ModelConfig(
        architecture=outer_architecture,
        model_type=str(field_of(text, "model_type", "")),
        vocab_size=int(text.vocab_size),
        hidden_size=int(text.hidden_size),
        intermediate_size=int(text.intermediate_size),
        num_layers=num_layers,
        num_heads=int(text.num_attention_heads),
        num_kv_heads=num_kv_heads_of(text),
        head_dim=head_dim,
        max_position_embeddings=int(text.max_position_embeddings),
        max_model_len=context_length(text),
        rms_norm_eps=float(field_of(text, "rms_norm_eps", 1e-6)),
        hidden_act=activation_of(text),
        attention_bias=bool(field_of(text, "attention_bias", False)),
        mlp_bias=bool(field_of(text, "mlp_bias", False)),
        tie_word_embeddings=_tied(hf_config, text),
        initializer_range=float(field_of(text, "initializer_range", 0.02)),
        layers=tuple(_layer_spec(text, kind, head_dim, partial_rotary) for kind in layer_types),
        final_logit_softcap=_optional_float(field_of(text, "final_logit_softcapping")),
        attention_out_bias=bool(field_of(text, "attention_out_bias", False)),
    )


def _layer_spec(text: Any, layer_type: str, head_dim: int, partial_rotary: bool) -> LayerSpec:
    # Gemma scales scores by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5.
    scale = float(field_of(text, "query_pre_attn_scalar", head_dim)) ** -0.5
    window = sliding_window_of(text) if layer_type == SLIDING else None
    attention = AttentionSpec(scale, window, _optional_float(field_of(text, "attn_logit_softcapping")))
    return LayerSpec(attention, _rope_spec(text, layer_type, head_dim, partial_rotary))


def _rope_spec(text: Any, layer_type: str, head_dim: int, partial_rotary: bool) -> RopeSpec:
    params = read_rope_parameters(text, layer_type)
    partial = float(params.get("partial_rotary_factor") or field_of(text, "partial_rotary_factor", 1.0))
    if partial != 1.0 and not partial_rotary:
        # transformers' model of these families turns the whole head whatever the field says (or
        # fails, with a scaled RoPE): serving either reading would be a silent guess.
        raise ValueError(
            f"unsupported partial_rotary_factor={partial} for model type "
            f"{field_of(text, 'model_type', '?')!r}: batchlm rotates every head dimension in this family, "
            "as transformers does"
        )
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"partial_rotary_factor={partial} gives an unusable rotary width {rotary_dim}")
    return RopeSpec(params, rotary_dim, int(text.max_position_embeddings))


def _tied(hf_config: Any, text: Any) -> bool:
    # Multimodal configs state tying on the outer config; the text config may only carry a default.
    outer = getattr(hf_config, "tie_word_embeddings", None)
    return bool(outer if outer is not None else field_of(text, "tie_word_embeddings", False))


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
