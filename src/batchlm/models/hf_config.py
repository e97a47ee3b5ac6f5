"""Raw readers of an HF model config (a transformers config or a ConfigView): the one place that
looks fields up by name. Model code reads the typed ModelConfig built from them (model_config.py)."""

from __future__ import annotations

from typing import Any

from batchlm.layers.rope_scaling import read_rope_parameters, scaled_max_position

SLIDING = "sliding_attention"
FULL = "full_attention"
# The model types whose configs keep the first max_window_layers layers out of the window; other
# families' transformers models (Qwen3-MoE's too) window every layer, whatever such a field says.
WINDOW_LAYERS_MODEL_TYPES = ("qwen2", "qwen3")


def field_of(config: Any, name: str, default: Any = None) -> Any:
    """`config.name`, or `default` when the config lacks it or states None."""
    value = getattr(config, name, None)
    return default if value is None else value


def text_config_of(config: Any) -> Any:
    """The language model's config: the nested `text_config` of a multimodal config, else config."""
    return field_of(config, "text_config", config)


def head_dim_of(config: Any) -> int:
    """The attention head size: explicit `head_dim` when the config has one, else hidden / heads."""
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def num_kv_heads_of(config: Any) -> int:
    """The config's key/value heads; ValueError where its query heads do not share them in equal
    groups (a config no attention of any backend can run)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if kv_heads <= 0 or heads % kv_heads:
        raise ValueError(
            f"the config's num_attention_heads ({heads}) is not a multiple of its num_key_value_heads "
            f"({kv_heads}): its query heads cannot share the key/value heads in equal groups"
        )
    return kv_heads


def sliding_window_of(config: Any) -> int | None:
    """The attention window the config enables, or None (Qwen configs carry a window they disable)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def layer_types_of(config: Any) -> list[str]:
    """ "sliding_attention" or "full_attention" per layer. Without `layer_types`, an enabled window
    applies to every layer (Mistral, Phi-3, Qwen3-MoE), or from `max_window_layers` on (older Qwen2
    and Qwen3 configs)."""
    num_layers = int(config.num_hidden_layers)
    stated = getattr(config, "layer_types", None)
    if stated:
        return _checked_layer_types([str(kind) for kind in stated], num_layers)
    if sliding_window_of(config) is None:
        return [FULL] * num_layers
    first_sliding = 0
    if field_of(config, "model_type") in WINDOW_LAYERS_MODEL_TYPES:
        first_sliding = int(field_of(config, "max_window_layers", 0))
    return [SLIDING if i >= first_sliding else FULL for i in range(num_layers)]


def _checked_layer_types(kinds: list[str], num_layers: int) -> list[str]:
    # Another kind of layer (chunked or linear attention) would otherwise be served as full attention.
    unknown = sorted(set(kinds) - {SLIDING, FULL})
    if unknown:
        raise ValueError(
            f"unsupported layer type(s) {', '.join(map(repr, unknown))} in layer_types; "
            f"batchlm implements {FULL!r} and {SLIDING!r}"
        )
    if len(kinds) != num_layers:
        raise ValueError(f"layer_types names {len(kinds)} layers but num_hidden_layers is {num_layers}")
    return kinds


def activation_of(config: Any) -> str:
    # Gemma configs name it hidden_activation.
    return str(field_of(config, "hidden_activation", None) or field_of(config, "hidden_act", "silu"))


def context_length(config: Any) -> int:
    """Max prompt + output tokens: the RoPE-scaled position limit. A sliding window is no cap: window
    layers attend to their window and the model serves its whole context. Configs with per-layer-type
    RoPE (Gemma 3) state the scaled length in max_position_embeddings already."""
    if _per_layer_type_rope(config):
        return int(config.max_position_embeddings)
    return scaled_max_position(read_rope_parameters(config), int(config.max_position_embeddings))


def _per_layer_type_rope(config: Any) -> bool:
    params = getattr(config, "rope_parameters", None)
    return isinstance(params, dict) and any(isinstance(value, dict) for value in params.values())


def check_common_support(config: Any) -> None:
    """Reject config features our model families do not implement, naming them."""
    from batchlm.layers.activation import ACTIVATIONS

    act = activation_of(config)
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {act!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    read_rope_parameters(config)  # raises on an unsupported RoPE type
    if field_of(config, "use_bidirectional_attention", False):
        # Gemma's embedding variants: prompt tokens would attend to later ones, which no causal
        # decoder over a KV cache does.
        raise ValueError(
            "unsupported use_bidirectional_attention=true (an encoder/embedding configuration); "
            "batchlm serves causal language models"
        )
