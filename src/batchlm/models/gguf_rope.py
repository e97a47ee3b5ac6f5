"""A GGUF file's RoPE scaling as the HF config states it.

llama.cpp's converter writes Llama 3's scaling (`rope_type: llama3`) as a tensor, `rope_freqs`: one
divisor a frequency, 1 for the fast ones, `factor` for the slow ones and a smooth band between. The
four parameters that made it are recovered here and checked by recomputing the divisors, so the
model runs the same RoPE as its HF checkpoint. Linear scaling comes as metadata. numpy only: the API
server derives the config without torch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from batchlm.models.gguf_reader import GGUFFile, round_float32

ROPE_FREQS = "rope_freqs.weight"
# Phi-3's LongRoPE: a factor per frequency for contexts up to the original length, and beyond it.
LONGROPE_FACTORS = {"short_factor": "rope_factors_short.weight", "long_factor": "rope_factors_long.weight"}
# Tensors that state RoPE, not weights.
ROPE_TENSORS = frozenset({ROPE_FREQS, *LONGROPE_FACTORS.values()})
# Llama 3.1-3.3's band (low_freq_factor, high_freq_factor, original_max_position_embeddings).
LLAMA3_BAND = (1.0, 4.0, 8192)
_RTOL = 1e-4
# Architectures whose HF configs state YaRN with `truncate: false` (gpt-oss's): the ramp between the
# kept and the stretched frequencies starts and ends at fractional dimensions. The file has no key for
# it (llama.cpp rounds the ends to whole dimensions for every model); the HF config's is followed here.
UNTRUNCATED_YARN_ARCHITECTURES = frozenset({"gpt-oss"})


def rope_scaling(
    reader: GGUFFile, arch: str, head_dim: int, theta: float, path: Path
) -> dict[str, Any] | None:
    """The config's rope_scaling for the file, None without scaling; ValueError naming a kind we do
    not read."""
    kind = str(reader.metadata(f"{arch}.rope.scaling.type", "none"))
    tensors = {t.name: t for t in reader.tensors if t.name in ROPE_TENSORS}
    if all(name in tensors for name in LONGROPE_FACTORS.values()):
        factors = {key: _float32_list(tensors[name].data) for key, name in LONGROPE_FACTORS.items()}
        return {"rope_type": "longrope", **factors}
    freqs = tensors.get(ROPE_FREQS)
    if freqs is not None and kind in ("none", "llama3"):
        divisors = np.asarray(freqs.data, dtype=np.float64).reshape(-1)
        if divisors.shape != (head_dim // 2,):
            raise ValueError(f"{path}: rope_freqs has {divisors.size} values for a head size of {head_dim}")
        if np.all(divisors == 1.0):
            return None
        scaling = llama3_parameters(divisors, theta, head_dim)
        if scaling is None:
            raise ValueError(f"{path}: its rope_freqs are not Llama 3's RoPE scaling, the one batchlm reads")
        return scaling
    if freqs is None and kind == "none":
        return None
    if freqs is None and kind == "linear":
        return {
            "rope_type": "linear",
            "factor": round_float32(reader.metadata(f"{arch}.rope.scaling.factor")),
        }
    if freqs is None and kind == "yarn":
        return _yarn(reader, arch, path)
    raise ValueError(
        f"{path}: GGUF RoPE scaling {kind!r} is not supported (batchlm reads llama3, linear, yarn and longrope)"
    )


def _yarn(reader: GGUFFile, arch: str, path: Path) -> dict[str, Any]:
    """YaRN as Qwen's and gpt-oss's configs state it: a factor over the original length, the ramp's
    betas where the file has them, and gpt-oss's untruncated ramp. An attention factor of llama.cpp's own, which HF configs do not state, is refused."""
    key = f"{arch}.rope.scaling"
    if reader.metadata(f"{key}.yarn_attn_factor") is not None or reader.metadata(
        f"{key}.yarn_log_multiplier"
    ):
        raise ValueError(f"{path}: YaRN with llama.cpp's own attention factor is not supported")
    scaling: dict[str, Any] = {
        "rope_type": "yarn",
        "factor": round_float32(reader.metadata(f"{key}.factor")),
        "original_max_position_embeddings": int(reader.metadata(f"{key}.original_context_length")),
    }
    for name in ("beta_fast", "beta_slow"):
        if (value := reader.metadata(f"{key}.yarn_{name}")) is not None:
            scaling[name] = round_float32(value)
    if arch in UNTRUNCATED_YARN_ARCHITECTURES:
        scaling["truncate"] = False
    return scaling


def _float32_list(values: Any) -> list[float]:
    return [round_float32(value) for value in np.asarray(values, dtype=np.float32).reshape(-1)]


def llama3_divisors(
    theta: float, head_dim: int, factor: float, low: float, high: float, original: float
) -> np.ndarray:
    """What each frequency is divided by under Llama 3's scaling."""
    wavelength = _wavelengths(theta, head_dim)
    smooth = (original / wavelength - low) / (high - low)
    divisors = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelength > original / low, factor, divisors)
    return np.where(wavelength < original / high, 1.0, divisors)


def llama3_parameters(divisors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any] | None:
    """The rope_scaling whose divisors these are; None where no Llama 3 band gives them."""
    factor = float(divisors.max())
    for low, high, original in (LLAMA3_BAND, *_band_of(divisors, factor, theta, head_dim)):
        expected = llama3_divisors(theta, head_dim, factor, low, high, original)
        if np.allclose(expected, divisors, rtol=_RTOL, atol=0):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": int(original),
            }
    return None


def _band_of(
    divisors: np.ndarray, factor: float, theta: float, head_dim: int
) -> list[tuple[float, float, int]]:
    """The band read off two frequencies inside it. Inside, the interpolation weight is linear in
    1 / wavelength, (original / wavelength - low) / (high - low); scaling original, low and high
    together changes nothing, so low is taken as 1."""
    inside = np.flatnonzero((divisors > 1 + _RTOL) & (divisors < factor * (1 - _RTOL)))
    if inside.size < 2:
        return []
    first, last = inside[0], inside[-1]
    inverse_wavelength = 1 / _wavelengths(theta, head_dim)
    weight = (1 / divisors - 1 / factor) / (1 - 1 / factor)
    slope = (weight[last] - weight[first]) / (inverse_wavelength[last] - inverse_wavelength[first])
    offset = weight[first] - slope * inverse_wavelength[first]
    if offset >= 0:
        return []
    low = 1.0
    high = round(low - 1 / offset, 4)
    return [(low, high, round(slope * (high - low)))]


def _wavelengths(theta: float, head_dim: int) -> np.ndarray:
    """Each RoPE frequency's wavelength in positions, 2 pi theta^(2i/d)."""
    return 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
