"""What the MLX backend adds to mlx-lm for the sliding-window families (Gemma 2/3, Phi-3, Mistral).

mlx-lm reads Gemma 3's RoPE bases from `rope_theta` / `rope_local_base_freq` and its layer pattern
from `sliding_window_pattern`; configs written by transformers 5 state them as per-layer-type
`rope_parameters` and `layer_types` instead, so they are translated into overrides here. mlx-lm's
Gemma 2, Phi-3 and Llama-architecture Mistral modules attend to the whole context whatever the
window, so for them the context is capped at the window: within it, full and windowed attention agree.
"""

from __future__ import annotations

from typing import Any

FULL, SLIDING = "full_attention", "sliding_attention"
# model_type -> does the mlx-lm module apply the config's sliding window?
APPLIES_WINDOW = {
    "gemma3": True,
    "gemma3_text": True,
    "gemma2": False,
    "phi3": False,
    "mistral": False,
    "qwen2": False,
    "qwen3": False,
    "qwen3_moe": False,
    "mixtral": False,
}


def mlx_lm_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    """Fields mlx-lm needs that this config.json states only in transformers 5's form (empty when
    none). ValueError for a layer pattern mlx-lm cannot express."""
    if raw.get("model_type") != "gemma3_text":
        return {}
    overrides: dict[str, Any] = {}
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get(FULL), dict):
        overrides["rope_theta"] = params[FULL].get("rope_theta", raw.get("rope_theta"))
        if isinstance(params.get(SLIDING), dict):
            overrides["rope_local_base_freq"] = params[SLIDING].get("rope_theta")
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list) and "sliding_window_pattern" not in raw:
        overrides["sliding_window_pattern"] = _pattern_period(layer_types)
    return {key: value for key, value in overrides.items() if value is not None and key not in raw}


def _pattern_period(layer_types: list[str]) -> int:
    # mlx-lm's Gemma 3 makes every n-th layer global: layer_types must repeat (n - 1) window layers
    # then one global layer.
    period = layer_types.index(FULL) + 1 if FULL in layer_types else len(layer_types) + 1
    expected = [FULL if (i + 1) % period == 0 else SLIDING for i in range(len(layer_types))]
    if layer_types != expected:
        raise ValueError(
            f"layer_types {layer_types} is not a repeating window/global pattern, which is all mlx-lm's "
            "Gemma 3 supports; use --backend torch"
        )
    return period


def window_context_cap(raw: dict[str, Any]) -> int | None:
    """The sliding window when mlx-lm would ignore it for this model (the context must stay inside
    it to give the model's results), else None."""
    nested = raw.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else raw
    model_type = str(raw.get("model_type"))
    window = text.get("sliding_window")
    if not isinstance(window, int) or window <= 0 or text.get("use_sliding_window") is False:
        return None
    return None if APPLIES_WINDOW.get(model_type, True) else window
