"""What the MLX backend adds to mlx-lm for the sliding-window families (Gemma 2/3, Phi-3, Mistral,
Ministral 3, EXAONE 4, gpt-oss: the last in gpt_oss.py).

mlx-lm reads Gemma 3's RoPE bases from `rope_theta` / `rope_local_base_freq` and its layer pattern
from `sliding_window_pattern`; configs written by transformers 5 state them as per-layer-type
`rope_parameters` and `layer_types` instead, so they are translated into overrides here. mlx-lm's
Gemma 2, Phi-3 and Llama-architecture Mistral modules ignore the window, and its Ministral 3 windows
only the layers `layer_types` names, so their windowed layers are given mlx-lm's own rotating
(sliding-window) KV cache here, whose masks keep each query inside its window. Families whose window
is not verified that way (Qwen 2/3, Mixtral with a window switched on) keep their context capped at
the window: within it, full and windowed attention agree.
"""

from __future__ import annotations

from typing import Any

from batchlm.backends.mlx.gpt_oss import gpt_oss_overrides

FULL, SLIDING = "full_attention", "sliding_attention"
QWEN_TYPES = frozenset({"qwen2", "qwen3", "qwen3_moe"})
# Qwen2Config's and Qwen3Config's default: the first 28 layers attend to the whole context.
QWEN_MAX_WINDOW_LAYERS = 28
# mlx-lm's Gemma 3 sliding_window_pattern when the config states none: every 6th layer is global.
MLX_LM_GEMMA3_PATTERN = 6
# Families whose windowed layers get a rotating KV cache from apply_sliding_window (mlx-lm's Ministral 3
# windows only the layers a config's layer_types names, transformers every layer of a config with a
# window).
WINDOWED_BY_CACHE = frozenset({"gemma2", "phi3", "mistral", "mistral3", "ministral3"})
# model_type -> does the mlx-lm module (or apply_sliding_window) apply the config's sliding window?
APPLIES_WINDOW = {
    "gemma3": True,
    "gemma3_text": True,
    "gemma2": True,
    "phi3": True,
    "mistral": True,
    "mistral3": True,
    "ministral3": True,
    # mlx-lm's EXAONE 4 and gpt-oss give their window layers rotating caches and window masks themselves.
    "exaone4": True,
    "gpt_oss": True,
    "qwen2": False,
    "qwen3": False,
    "qwen3_moe": False,
    "mixtral": False,
}


# Families this backend refuses at load, naming why: mlx-lm has a module for them that is not held to
# transformers' results here.
REFUSED_TYPES: dict[str, str] = {}


def mlx_lm_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    """Fields mlx-lm needs that this config.json states only in transformers 5's form (empty when
    none). ValueError for a layer pattern mlx-lm cannot express, and for a refused family."""
    refused = REFUSED_TYPES.get(str(raw.get("model_type")))
    if refused is not None:
        raise ValueError(f"the mlx backend does not serve this model: {refused}; use --backend torch")
    if raw.get("model_type") == "exaone4":
        return _exaone4_overrides(raw)
    if raw.get("model_type") == "gpt_oss":
        return gpt_oss_overrides(raw)
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
    _check_a_global_layer(raw, overrides.get("sliding_window_pattern", raw.get("sliding_window_pattern")))
    return {key: value for key, value in overrides.items() if value is not None and key not in raw}


def _exaone4_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm's EXAONE 4 reads its layers from `sliding_window_pattern` as a string, one letter a layer
    repeating ("LLLG": L a window layer, which rotates, G a global one, which does not), and requires
    `rope_scaling`; transformers 5 states the layers as `layer_types` (the pattern as a period) and
    leaves plain RoPE's scaling out. Without a window, no pattern: every layer global and rotating, as
    transformers has it."""
    overrides: dict[str, Any] = {"sliding_window_pattern": None}
    if "rope_scaling" not in raw:
        overrides["rope_scaling"] = None  # config_names derives a scaled RoPE's, which takes over
    if _sliding_window(raw) is None:
        return overrides
    kinds = _exaone4_layer_types(raw)
    if SLIDING not in kinds or FULL not in kinds:
        # mlx-lm's module builds its masks from its first window layer's cache and its first global one's.
        raise ValueError(
            f"this EXAONE 4 config's layers ({kinds}) do not mix window and global layers, as mlx-lm's "
            "EXAONE 4 needs when a sliding window is set; use --backend torch"
        )
    overrides["sliding_window_pattern"] = "".join("L" if kind == SLIDING else "G" for kind in kinds)
    return overrides


def _exaone4_layer_types(raw: dict[str, Any]) -> list[str]:
    """Each layer's kind in an EXAONE 4 config: `layer_types`, else its pattern: a period (every
    period-th layer global, as transformers reads it) or mlx-lm's own string of L and G."""
    stated = raw.get("layer_types")
    if isinstance(stated, list):
        return [str(kind) for kind in stated]
    layers, pattern = int(raw.get("num_hidden_layers") or 0), raw.get("sliding_window_pattern", 4)
    if isinstance(pattern, str) and pattern:
        return [SLIDING if pattern[i % len(pattern)] == "L" else FULL for i in range(layers)]
    if isinstance(pattern, int) and pattern > 0:
        return [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    return []


def _check_a_global_layer(raw: dict[str, Any], pattern: Any) -> None:
    # mlx-lm's Gemma 3 builds its global mask from layer pattern - 1's cache: with fewer layers than the
    # pattern (no global layer) every forward raised IndexError, failing each request of a loaded model.
    layers = raw.get("num_hidden_layers")
    pattern = MLX_LM_GEMMA3_PATTERN if pattern is None else pattern
    if isinstance(layers, int) and isinstance(pattern, int) and pattern > layers:
        raise ValueError(
            f"this Gemma 3 config has no global-attention layer (sliding_window_pattern {pattern} over "
            f"{layers} layers), which mlx-lm's Gemma 3 cannot run; use --backend torch"
        )


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


def _text_config(raw: dict[str, Any]) -> dict[str, Any]:
    # A multimodal config (Mistral 3) nests the language model's settings.
    nested = raw.get("text_config")
    return nested if isinstance(nested, dict) else raw


def _sliding_window(raw: dict[str, Any]) -> int | None:
    """The window some layer of the model attends within, as transformers reads the config; None: none."""
    text = _text_config(raw)
    window = text.get("sliding_window")
    if not isinstance(window, int) or window <= 0 or text.get("use_sliding_window") is False:
        return None
    if raw.get("model_type") in QWEN_TYPES and not _qwen_windows_a_layer(str(raw.get("model_type")), text):
        return None
    return window


def _qwen_windows_a_layer(model_type: str, text: dict[str, Any]) -> bool:
    # Qwen config classes drop a window unless use_sliding_window is true; Qwen 2 and 3 then window
    # the layers from max_window_layers (28 unless stated) on, or those layer_types names.
    if text.get("use_sliding_window") is not True:
        return False
    if model_type == "qwen3_moe":
        return True
    layer_types = text.get("layer_types")
    if isinstance(layer_types, list):
        return SLIDING in layer_types
    layers, first = text.get("num_hidden_layers"), text.get("max_window_layers", QWEN_MAX_WINDOW_LAYERS)
    return isinstance(layers, int) and isinstance(first, int) and first < layers


def window_context_cap(raw: dict[str, Any]) -> int | None:
    """The sliding window when neither mlx-lm nor apply_sliding_window applies it for this model (the
    context must stay inside it to give the model's results), else None."""
    window = _sliding_window(raw)
    if window is None or APPLIES_WINDOW.get(str(raw.get("model_type")), True):
        return None
    return window


def windowed_layers(raw: dict[str, Any], num_layers: int) -> list[bool] | None:
    """Which layers attend within the sliding window, for the families apply_sliding_window serves;
    None when there is no window to apply."""
    window = _sliding_window(raw)
    if window is None or raw.get("model_type") not in WINDOWED_BY_CACHE:
        return None
    layer_types = _text_config(raw).get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        return [kind == SLIDING for kind in layer_types]
    if raw.get("model_type") == "gemma2":
        # Gemma 2 configs that predate layer_types alternate window and global layers, window first.
        return [i % 2 == 0 for i in range(num_layers)]
    return [True] * num_layers


def apply_sliding_window(model: Any, raw: dict[str, Any]) -> bool:
    """Give the model's windowed layers a rotating KV cache of the window's size (their keys, and
    the masks the cache builds, then reach only the window); True when the model has a window."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    window = _sliding_window(raw)
    flags = windowed_layers(raw, len(model.layers))
    if window is None or flags is None or not any(flags):
        return False

    def make_cache() -> list[Any]:
        return [RotatingKVCache(max_size=window) if windowed else KVCache() for windowed in flags]

    # make_prompt_cache (and so mlx-lm's BatchGenerator) asks the model for its caches.
    model.make_cache = make_cache
    if not all(flags):
        # The module builds one mask from layer 0's cache; mixed layers each need their own.
        for layer in model.layers:
            layer.__class__ = _masking_from_own_cache(type(layer))
    return True


# Block class -> its subclass that masks from its own cache (one per class, shared by all layers).
_OWN_MASK_BLOCKS: dict[type, type] = {}


def _masking_from_own_cache(block_type: type) -> type:
    """A subclass of a transformer block that ignores the mask it is given and builds its own from
    its layer's cache (a window mask for a rotating cache, a causal one for a full cache)."""
    from mlx_lm.models.base import create_attention_mask

    if block_type in _OWN_MASK_BLOCKS.values():
        return block_type

    def call(self: Any, x: Any, mask: Any = None, cache: Any = None) -> Any:
        return block_type.__call__(self, x, create_attention_mask(x, cache, return_array=True), cache)

    return _OWN_MASK_BLOCKS.setdefault(
        block_type, type(f"OwnMask{block_type.__name__}", (block_type,), {"__call__": call})
    )


def group_attention_masks(model: Any, raw: dict[str, Any]) -> None:
    """mlx-lm's Gemma 2 attends with its query heads grouped per KV head: scores [B, kv heads, repeats,
    L, S], which a batch's mask [B, 1, L, S] does not broadcast against once B > 1 (every step that
    decodes two sequences side by side raised). Its attention modules get the mask an axis for the
    repeats."""
    if raw.get("model_type") != "gemma2":
        return
    for layer in model.layers:
        if getattr(layer.self_attn, "repeats", 1) > 1:
            layer.self_attn.__class__ = _grouped_mask_attention(type(layer.self_attn))


# Attention class -> its subclass that widens a batch's mask for grouped query heads.
_GROUPED_MASK_ATTENTION: dict[type, type] = {}


def _grouped_mask_attention(attention_type: type) -> type:
    import mlx.core as mx

    if attention_type in _GROUPED_MASK_ATTENTION.values():
        return attention_type

    def call(self: Any, x: Any, mask: Any = None, cache: Any = None) -> Any:
        if isinstance(mask, mx.array) and mask.ndim == 4:
            mask = mx.expand_dims(mask, 2)  # [B, 1, L, S] -> [B, 1, 1, L, S]
        return attention_type.__call__(self, x, mask, cache)

    return _GROUPED_MASK_ATTENTION.setdefault(
        attention_type, type(f"GroupedMask{attention_type.__name__}", (attention_type,), {"__call__": call})
    )
