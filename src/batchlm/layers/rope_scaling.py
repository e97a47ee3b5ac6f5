"""RoPE parameters from an HF config and the inverse frequencies of each supported scaling type.

Reads transformers 5's `config.rope_parameters` (flat, or one entry per layer type as Gemma 3 writes
it) or transformers 4's `rope_scaling` + `rope_theta`.
Supported types: default, linear, dynamic (NTK), llama3, yarn, longrope (Phi-3).
"""

from __future__ import annotations

import math
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
DEFAULT_THETA = 10000.0


def read_rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """One flat dict with at least rope_type and rope_theta, whichever transformers wrote the config.

    `layer_type` picks the entry of per-layer-type parameters ("full_attention", "sliding_attention")."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", None) or DEFAULT_THETA)
    params = dict(params)
    nested = any(isinstance(value, dict) for value in params.values())
    if nested:
        params = _per_layer_type_entry(params, layer_type)
    # transformers 4 wrote the type as "type"; 5 writes "rope_type".
    rope_type = params.pop("type", None)
    params.setdefault("rope_type", rope_type or "default")
    params.setdefault("rope_theta", DEFAULT_THETA)
    if params["rope_type"] in ("su", "yarn") and "short_factor" in params:
        params["rope_type"] = "longrope"  # Phi-3's older name for the same scaling
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported RoPE scaling type {params['rope_type']!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        # As transformers reads it: a flat config's own original_max_position_embeddings wins over
        # the RoPE dict's (Phi-3 states it there); per-layer-type entries fall back to the limit.
        stated = None if nested else getattr(config, "original_max_position_embeddings", None)
        if stated is not None:
            params["original_max_position_embeddings"] = stated
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    if params["rope_type"] == "longrope":
        params.setdefault("max_position_embeddings", config.max_position_embeddings)
    return params


def _per_layer_type_entry(params: dict[str, Any], layer_type: str | None) -> dict[str, Any]:
    entry = params.get(layer_type or "full_attention")
    if not isinstance(entry, dict):
        raise ValueError(f"the per-layer-type RoPE parameters have no entry for {layer_type!r}")
    return dict(entry)


def scaled_max_position(params: dict[str, Any], max_position_embeddings: int) -> int:
    """The longest context the scaled RoPE is meant for (linear and dynamic stretch the config's
    limit by `factor`; yarn stretches its original length; llama3 configs already state theirs)."""
    rope_type = params["rope_type"]
    if rope_type in ("linear", "dynamic"):
        return int(max_position_embeddings * params["factor"])
    if rope_type == "yarn" and params.get("factor"):
        return max(
            max_position_embeddings, int(params["original_max_position_embeddings"] * params["factor"])
        )
    return max_position_embeddings


def base_inv_freq(theta: float | torch.Tensor, head_dim: int) -> torch.Tensor:
    """theta^(-2i/d) for i < d/2: [head_dim // 2] float32, or [P, head_dim // 2] for a [P] theta."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if isinstance(theta, torch.Tensor):
        return 1.0 / (theta.unsqueeze(-1) ** exponents)
    return 1.0 / (theta**exponents)


def inv_freq_and_scaling(params: dict[str, Any], head_dim: int) -> tuple[torch.Tensor, float]:
    """Position-independent inverse frequencies [head_dim // 2] and the cos/sin multiplier."""
    rope_type = params["rope_type"]
    inv_freq = base_inv_freq(params["rope_theta"], head_dim)
    if rope_type in ("default", "dynamic"):
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(params, inv_freq), 1.0
    if rope_type == "longrope":
        return longrope_inv_freq(params, head_dim, "short_factor"), longrope_attention_factor(params)
    return _yarn_inv_freq(params, head_dim)


def _llama3_inv_freq(params: dict[str, Any], inv_freq: torch.Tensor) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, and the band between interpolated.
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, interpolated)
    return torch.where(wavelen < old_len / high, inv_freq, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(params: dict[str, Any], head_dim: int) -> tuple[torch.Tensor, float]:
    # Dimensions that rotate fast keep their frequency (extrapolate), slow ones are divided by
    # `factor` (interpolate), with a linear ramp between the beta_fast and beta_slow boundaries.
    theta = params["rope_theta"]
    factor = params["factor"]
    original = params["original_max_position_embeddings"]
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def dim_for_rotations(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = base_inv_freq(theta, head_dim)
    inv_freq = extrapolated / factor * ramp + extrapolated * (1 - ramp)
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def dynamic_ntk_inv_freq(
    params: dict[str, Any], head_dim: int, max_position_embeddings: int, positions: torch.Tensor
) -> torch.Tensor:
    """Per-position NTK-aware frequencies [P, head_dim // 2]: position p uses the base stretched for a
    sequence of max(p + 1, max_position_embeddings) tokens, which is what transformers applies to a
    token decoded at position p (its prefill of a prompt longer than the limit instead uses the
    prompt length for every prompt token)."""
    factor = params["factor"]
    seq_len = (positions.double() + 1).clamp(min=max_position_embeddings)
    stretch = factor * seq_len / max_position_embeddings - (factor - 1)
    theta = params["rope_theta"] * stretch ** (head_dim / (head_dim - 2))
    return base_inv_freq(theta.float(), head_dim)


def longrope_attention_factor(params: dict[str, Any]) -> float:
    """LongRoPE's cos/sin multiplier: stated, or derived from how far the context was stretched."""
    stated = params.get("attention_factor")
    if stated is not None:
        return float(stated)
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or params["max_position_embeddings"] / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def longrope_inv_freq(params: dict[str, Any], head_dim: int, which: str) -> torch.Tensor:
    """LongRoPE's inverse frequencies [head_dim // 2] with the "short_factor" (positions below
    original_max_position_embeddings) or the "long_factor" rescaling (past it)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    factors = torch.tensor(params[which], dtype=torch.float32)
    theta = float(params["rope_theta"])
    inv_freq: torch.Tensor = 1.0 / (factors * theta**exponents)
    return inv_freq
