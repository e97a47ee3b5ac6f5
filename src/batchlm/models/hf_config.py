"""Derived facts about an HF model config that several modules need (head size, context limit)."""

from __future__ import annotations

from typing import Any

from batchlm.layers.rope_scaling import read_rope_parameters, scaled_max_position


def head_dim_of(config: Any) -> int:
    """The attention head size: explicit `head_dim` when the config has one, else hidden / heads."""
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def num_kv_heads_of(config: Any) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def sliding_window_of(config: Any) -> int | None:
    """The attention window the config enables, or None (Qwen configs carry a window they disable)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def context_length(config: Any) -> int:
    """Max prompt + output tokens: the RoPE-scaled position limit, capped by a sliding window.

    We do not implement sliding-window attention; within the window it equals full attention, so
    capping the context there keeps results exact.
    """
    limit = scaled_max_position(read_rope_parameters(config), int(config.max_position_embeddings))
    window = sliding_window_of(config)
    return min(limit, window) if window else limit


def check_common_support(config: Any) -> None:
    """Reject config features our Llama-style families do not implement, naming them."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' is implemented")
    read_rope_parameters(config)  # raises on an unsupported RoPE type
