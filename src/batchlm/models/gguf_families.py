"""What each GGUF architecture adds to the HF config read from a file's common keys (gguf_file.hf_config):
windows, soft-caps, partial rotation, multipliers, experts, which layers rotate. A new architecture whose
file needs more than the common keys is one reader here and one line in family_config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchlm.models.gguf_metadata import required, required_int
from batchlm.models.gguf_reader import GGUFFile, round_float32

# llama.cpp writes Mixtral as a "llama" file with experts; read as this layout (gguf_file.gguf_layout).
MIXTRAL_LAYOUT = "mixtral"
# Files whose heads rotate only rope.dimension_count of their dimensions (partial rotary).
PARTIAL_ROTARY_ARCHITECTURES = frozenset({"phi3", "glm4"})
# llama.cpp's smollm3 leaves RoPE out of every fourth layer (a fixed step: the file has no key for it).
SMOLLM3_NO_ROPE_INTERVAL = 4
# EXAONE 4.0's window layers when a file states a window but no pattern: three of every four.
EXAONE4_PATTERN_PERIOD = 4
# gpt-oss's, as llama.cpp assumes it and the HF configs' layer_types say: every other layer (the even
# ones) slides.
GPT_OSS_PATTERN_PERIOD = 2
# The clamp of gpt-oss's SwiGLU, which llama.cpp fixes in its code (the file has no key for it): the
# released configs' swiglu_limit.
GPT_OSS_SWIGLU_LIMIT = 7.0
# The HF config's layer_types (hf_config.SLIDING / FULL, not imported: that module needs torch, which
# reading a GGUF file's config does without).
SLIDING, FULL = "sliding_attention", "full_attention"
# Granite's multipliers: llama.cpp's metadata key (after the architecture) -> the HF config field.
GRANITE_SCALES = {
    "embedding_scale": "embedding_multiplier",
    "residual_scale": "residual_multiplier",
    "attention.scale": "attention_multiplier",
    "logit_scale": "logits_scaling",
}

GEMMA_ARCHITECTURES = frozenset({"gemma2", "gemma3"})
# What llama.cpp assumes for a Gemma 2 file without these keys (Gemma 2's own values): its window, and
# soft-caps, which it always applies to Gemma 2.
GEMMA2_WINDOW = 4096
GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}


def family_config(
    reader: GGUFFile, arch: str, layout: str, config: dict[str, Any], path: Path
) -> dict[str, Any]:
    """The config fields the file's architecture (and layout) adds to or overrides in `config`, the
    fields every file gives."""
    _check_full_rotation(reader, arch, config["head_dim"], path)
    extra: dict[str, Any] = {}
    if config["model_type"] in ("qwen2", "qwen3"):
        extra["use_sliding_window"] = False
    if arch in GEMMA_ARCHITECTURES:
        extra.update(_gemma_config(reader, arch, config, path))
    if arch in PARTIAL_ROTARY_ARCHITECTURES:
        extra.update(_partial_rotary(reader, arch, config))
    if arch == "phi3":
        extra.update(_phi3_config(reader))
    if arch == "glm4":
        extra.update(_glm4_config(reader))
    if arch == "seed_oss":
        extra.update(_seed_oss_config(reader))
    if arch == "exaone4":
        extra.update(_exaone4_config(reader, arch, config["num_hidden_layers"], path))
    if arch == "gpt-oss":
        extra.update(_gpt_oss_config(reader, arch, config["num_hidden_layers"], path))
    if arch == "granite":
        extra.update(_granite_config(reader, arch, path))
    if arch == "smollm3":
        extra.update(no_rope_layer_interval=SMOLLM3_NO_ROPE_INTERVAL, use_sliding_window=False)
    if arch == "qwen3moe":
        extra.update(_moe_config(reader, arch, path))
    if layout == MIXTRAL_LAYOUT:
        extra.update(_mixtral_config(reader, arch, path))
    return extra


def _check_full_rotation(reader: GGUFFile, arch: str, head_dim: int, path: Path) -> None:
    """llama.cpp rotates the first rope.dimension_count dimensions of each head; batchlm reads a
    narrower width for PARTIAL_ROTARY_ARCHITECTURES only (_partial_rotary), so elsewhere it must be
    the whole head."""
    key = f"{arch}.rope.dimension_count"
    rotary = reader.metadata(key)
    if arch not in PARTIAL_ROTARY_ARCHITECTURES and rotary is not None and rotary != head_dim:
        raise ValueError(
            f"{path}: GGUF metadata {key!r} is {rotary!r}, a rotation of part of the {head_dim}-wide "
            f"heads, which batchlm runs for {' and '.join(sorted(PARTIAL_ROTARY_ARCHITECTURES))} only"
        )


def _partial_rotary(reader: GGUFFile, arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """The rotating share of each head (Phi-4-mini's, GLM-4's half). Stated for GLM-4 even when whole:
    its config class defaults to half a head."""
    rotary = int(reader.metadata(f"{arch}.rope.dimension_count", config["head_dim"]))
    if rotary == config["head_dim"] and arch != "glm4":
        return {}
    return {"partial_rotary_factor": rotary / config["head_dim"]}


def _gemma_config(reader: GGUFFile, arch: str, config: dict[str, Any], path: Path) -> dict[str, Any]:
    """What Gemma adds: the sliding window (every other layer in Gemma 2, five of six in Gemma 3, as
    their HF configs default and llama.cpp assumes), logit soft-caps, and the query scale, which the
    file does not store: 1/sqrt(head_dim), but 1/sqrt(hidden/heads) for the 27B models, as llama.cpp
    sets it (their HF configs say query_pre_attn_scalar 144 and 168). A Gemma 2 file that lacks the
    window or a soft-cap (the first conversions did) gets llama.cpp's values, Gemma 2's own."""
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    is_27b = (arch, layers, hidden) in (("gemma2", 46, 4608), ("gemma3", 62, 5376))
    extra: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "sliding_window": required_int(
            reader, f"{arch}.attention.sliding_window", path, GEMMA2_WINDOW if arch == "gemma2" else None
        ),
        "query_pre_attn_scalar": hidden // heads if is_27b else config["head_dim"],
        "tie_word_embeddings": True,
    }
    if arch == "gemma2":
        for key, default in GEMMA2_SOFTCAPS.items():
            extra[key] = round_float32(reader.metadata(f"{arch}.{key}", default))
    else:
        # Gemma 3's local layers rotate at base 10000 (llama.cpp's fixed value too), unscaled.
        extra["rope_local_base_freq"] = 10000.0
    return extra


def _granite_config(reader: GGUFFile, arch: str, path: Path) -> dict[str, Any]:
    """Granite's four multipliers, which llama.cpp requires of a granite file too."""
    return {
        field: round_float32(required(reader, f"{arch}.{key}", path, float))
        for key, field in GRANITE_SCALES.items()
    }


def _moe_config(reader: GGUFFile, arch: str, path: Path) -> dict[str, Any]:
    """Qwen3-MoE's experts: every layer sparse, the kept routing weights renormalized (as llama.cpp
    runs this architecture and Qwen's configs say)."""
    return {
        "num_experts": required_int(reader, f"{arch}.expert_count", path),
        "num_experts_per_tok": required_int(reader, f"{arch}.expert_used_count", path),
        "moe_intermediate_size": required_int(reader, f"{arch}.expert_feed_forward_length", path),
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def _mixtral_config(reader: GGUFFile, arch: str, path: Path) -> dict[str, Any]:
    """Mixtral's experts: every layer sparse, each expert feed_forward_length wide (the config's
    intermediate_size), the kept routing weights renormalized (as HF's Mixtral and llama.cpp run it);
    no sliding window."""
    return {
        "num_local_experts": required_int(reader, f"{arch}.expert_count", path),
        "num_experts_per_tok": required_int(reader, f"{arch}.expert_used_count", path),
        "sliding_window": None,
    }


def _phi3_config(reader: GGUFFile) -> dict[str, Any]:
    """Phi-3's window and LongRoPE's original length."""
    extra: dict[str, Any] = {}
    window = reader.metadata("phi3.attention.sliding_window")
    extra["sliding_window"] = int(window) if window else None
    original = reader.metadata("phi3.rope.scaling.original_context_length")
    if original is not None:
        extra["original_max_position_embeddings"] = int(original)
    return extra


def _glm4_config(reader: GGUFFile) -> dict[str, Any]:
    """GLM-4's q/k/v biases, which its files hold where the checkpoint had them (attention_bias)."""
    return {"attention_bias": any(t.name == "blk.0.attn_q.bias" for t in reader.tensors)}


def _seed_oss_config(reader: GGUFFile) -> dict[str, Any]:
    """Seed-OSS's biases, each its own config field, from the tensors the file holds (its q/k/v ones in
    the published checkpoints)."""
    names = {t.name for t in reader.tensors}
    return {
        "attention_bias": "blk.0.attn_q.bias" in names,
        "attention_out_bias": "blk.0.attn_output.bias" in names,
        "mlp_bias": "blk.0.ffn_down.bias" in names,
    }


def _exaone4_config(reader: GGUFFile, arch: str, num_layers: int, path: Path) -> dict[str, Any]:
    """EXAONE 4.0's window and which layers use it (the others global and without RoPE), as the
    converter writes them from the HF config. A file without a window has every layer global and
    rotating, as its config had it."""
    window = reader.metadata(f"{arch}.attention.sliding_window")
    if not window:
        return {"sliding_window": None, "layer_types": [FULL] * num_layers}
    layer_types = _window_layer_types(reader, arch, num_layers, EXAONE4_PATTERN_PERIOD, path)
    return {"sliding_window": int(window), "layer_types": layer_types}


def _gpt_oss_config(reader: GGUFFile, arch: str, num_layers: int, path: Path) -> dict[str, Any]:
    """gpt-oss's experts (each expert_feed_forward_length wide: the HF config's intermediate_size),
    its window and the layers that use it, its attention biases (q/k/v/o together, as the config's one
    field has them) by the tensors the file holds, and the SwiGLU clamp llama.cpp fixes."""
    return {
        "num_local_experts": required_int(reader, f"{arch}.expert_count", path),
        "num_experts_per_tok": required_int(reader, f"{arch}.expert_used_count", path),
        "intermediate_size": required_int(reader, f"{arch}.expert_feed_forward_length", path),
        "sliding_window": required_int(reader, f"{arch}.attention.sliding_window", path),
        "layer_types": _window_layer_types(reader, arch, num_layers, GPT_OSS_PATTERN_PERIOD, path),
        "attention_bias": any(t.name == "blk.0.attn_q.bias" for t in reader.tensors),
        "swiglu_limit": GPT_OSS_SWIGLU_LIMIT,
    }


def _window_layer_types(
    reader: GGUFFile, arch: str, num_layers: int, default_period: int, path: Path
) -> list[str]:
    """Which layers slide, as llama.cpp reads `sliding_window_pattern`: one flag a layer, or a period
    (every period-th layer global, the others sliding); without it, the architecture's period."""
    pattern = reader.metadata(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        if len(pattern) != num_layers:
            raise ValueError(
                f"{path}: {arch}.attention.sliding_window_pattern names {len(pattern)} layers of {num_layers}"
            )
        windowed = [bool(flag) for flag in pattern]
    else:
        period = int(pattern or default_period)
        windowed = [(i + 1) % period != 0 for i in range(num_layers)]
    return [SLIDING if w else FULL for w in windowed]
