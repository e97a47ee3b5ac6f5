"""gpt-oss on mlx-lm's module, held to transformers' GptOssForCausalLM.

mlx-lm's gpt-oss applies the sinks, the biased router and experts (gate/up rows interleaved), the window
layers' rotating KV cache and window masks as transformers does. What it reads otherwise is given here:
- transformers 5 writes the experts as stacks [experts, in, out] named `gate_up_proj` / `down_proj`;
  mlx-lm's sanitize takes only the released MXFP4 blocks or its own converted per-projection weights
  (a transformers checkpoint failed at load), so the stacks are transposed and split here;
- mlx-lm's SwiGLU clamps at 7.0 whatever the config's `swiglu_limit`;
- mlx-lm's YaRN always rounds the correction range outward; the released configs state
  `truncate: false`, which transformers reads as the unrounded range (other frequencies);
- without `layer_types`, mlx-lm's default pattern covers only an even number of layers (the last of an
  odd count was skipped), so transformers' default is stated.
The released MXFP4 experts load as mlx's own "mxfp4" quantized weights (mlx-lm's loader and sanitize).
"""

from __future__ import annotations

import math
from typing import Any

FULL, SLIDING = "full_attention", "sliding_attention"
# transformers' GptOssConfig default.
DEFAULT_SWIGLU_LIMIT = 7.0


def gpt_oss_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    """Fields mlx-lm's gpt-oss reads that this config leaves to transformers' defaults; ValueError for
    layers mlx-lm's module cannot mask (it builds its masks from its first window and first full layer)."""
    overrides: dict[str, Any] = {}
    layer_types = raw.get("layer_types")
    if not isinstance(layer_types, list):
        layers = int(raw.get("num_hidden_layers") or 0)
        layer_types = [SLIDING if (i + 1) % 2 else FULL for i in range(layers)]
        overrides["layer_types"] = layer_types
    if SLIDING not in layer_types or FULL not in layer_types:
        raise ValueError(
            f"this gpt-oss config's layers ({layer_types}) do not mix window and full-attention layers, "
            "as mlx-lm's gpt-oss needs; use --backend torch"
        )
    return overrides


def model_classes(config: dict[str, Any]) -> tuple[type, type]:
    """mlx-lm's classes for this config (its own lookup), gpt-oss's replaced by the ones below."""
    from mlx_lm.utils import _get_classes

    if config.get("model_type") != "gpt_oss":
        return _get_classes(config)  # type: ignore[no-any-return]
    return _gpt_oss_classes()


_CLASSES: list[tuple[type, type]] = []


def _gpt_oss_classes() -> tuple[type, type]:
    # Built on first use: mlx-lm is imported only where the backend runs.
    if not _CLASSES:
        _CLASSES.append(_build_classes())
    return _CLASSES[0]


def _build_classes() -> tuple[type, type]:
    from dataclasses import dataclass

    from mlx_lm.models import gpt_oss

    @dataclass
    class ModelArgs(gpt_oss.ModelArgs):  # type: ignore[misc]
        swiglu_limit: float = DEFAULT_SWIGLU_LIMIT

    class Model(gpt_oss.Model):  # type: ignore[misc]
        def __init__(self, args: ModelArgs) -> None:
            super().__init__(args)
            for layer in self.layers:
                layer.mlp.experts.activation._limit = float(args.swiglu_limit)
                untruncate_yarn(layer.self_attn.rope, args.rope_scaling, args.rope_theta, args.head_dim)

        def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
            return super().sanitize(split_transformers_experts(weights))  # type: ignore[no-any-return,no-untyped-call]

    return Model, ModelArgs


def split_transformers_experts(weights: dict[str, Any]) -> dict[str, Any]:
    """transformers' expert stacks ([experts, in, out], gate and up columns interleaved) and their biases
    as mlx-lm's per-projection weights ([experts, out, in]) and biases. A checkpoint without such stacks
    (the released MXFP4 blocks, mlx-lm's own conversions) as it is, for mlx-lm's sanitize."""
    if not any(name.endswith(TRANSFORMERS_STACKS) for name in weights):
        return weights
    split: dict[str, Any] = {}
    for name, value in weights.items():
        split.update(_per_projection(name, value))
    return split


# The names of transformers' expert tensors, and the per-projection parameters mlx-lm's SwitchGLU holds.
TRANSFORMERS_STACKS = (".experts.gate_up_proj", ".experts.down_proj")


def _per_projection(name: str, value: Any) -> dict[str, Any]:
    import mlx.core as mx

    if name.endswith(".experts.gate_up_proj"):
        rows = value.swapaxes(-1, -2)  # [experts, out, in]: gate, up, gate, up... rows
        base = name.removesuffix("gate_up_proj")
        return {f"{base}gate_proj.weight": mx.contiguous(rows[..., ::2, :]),
                f"{base}up_proj.weight": mx.contiguous(rows[..., 1::2, :])}  # fmt: skip
    if name.endswith(".experts.gate_up_proj_bias"):
        base = name.removesuffix("gate_up_proj_bias")
        return {f"{base}gate_proj.bias": mx.contiguous(value[..., ::2]),
                f"{base}up_proj.bias": mx.contiguous(value[..., 1::2])}  # fmt: skip
    if name.endswith(".experts.down_proj"):
        return {f"{name}.weight": mx.contiguous(value.swapaxes(-1, -2))}
    if name.endswith(".experts.down_proj_bias"):
        return {name.removesuffix("_bias") + ".bias": value}
    return {name: value}


def untruncate_yarn(rope: Any, scaling: Any, base: float, dims: int) -> None:
    """Give mlx-lm's YarnRoPE transformers' frequencies for a config stating `truncate: false` (the
    correction range's ends not rounded outward); other RoPE as it is."""
    import mlx.core as mx

    if not isinstance(scaling, dict) or scaling.get("truncate", True) is not False:
        return
    if (scaling.get("rope_type") or scaling.get("type")) != "yarn":
        return
    periods = yarn_periods(
        dims,
        float(base),
        float(scaling["factor"]),
        int(scaling.get("original_max_position_embeddings", 4096)),
        float(scaling.get("beta_fast", 32)),
        float(scaling.get("beta_slow", 1)),
    )
    rope._freqs = mx.array(periods, dtype=mx.float32)


def yarn_periods(
    dims: int, base: float, factor: float, original_positions: int, beta_fast: float, beta_slow: float
) -> list[float]:
    """YaRN's per-pair rotation periods (mx.fast.rope's `freqs`: the inverse of transformers'
    inv_freq) over the unrounded correction range: each pair blends its extrapolated frequency with
    the interpolated one (divided by factor) along a ramp between the range's ends."""

    def correction_dim(rotations: float) -> float:
        return dims * math.log(original_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(correction_dim(beta_fast), 0.0), min(correction_dim(beta_slow), dims - 1.0)
    if low == high:
        high += 0.001  # as transformers keeps the ramp finite
    periods = []
    for pair in range(dims // 2):
        extrapolated = base ** (-2 * pair / dims)
        kept = 1.0 - min(max((pair - low) / (high - low), 0.0), 1.0)
        inv_freq = extrapolated / factor * (1.0 - kept) + extrapolated * kept
        periods.append(1.0 / inv_freq)
    return periods
