"""config.json as a plain attribute view, used instead of transformers' config class when it reads the same.

Why: importing a transformers config class can cost seconds before the model can be built. In
transformers 5.17 the class docstring decorator imports the whole generation stack (torch._dynamo,
torch.distributed, scikit-learn when installed): seconds of the engine core's start-up on the GPU
machine (BENCHMARKS.md, "Figures that left the source"). The engine reads few fields (sizes, norm epsilon, RoPE, biases, tying, sliding window), so a
view of config.json serves when each of them is stated in the file, or absent where every supported
config class defaults to what batchlm's readers assume when a field is missing (no biases, untied
embeddings, silu, RoPE theta 10000, head_dim = hidden / heads). Anything else returns None and the
caller builds the transformers config as before; tests/test_config_view.py pins the equivalence.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from batchlm.models.registry import MODEL_REGISTRY

# Sizes whose defaults differ between config classes: a view needs them stated, as positive integers.
REQUIRED_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "vocab_size",
    "max_position_embeddings",
)
# Per model type, fields whose transformers default differs from what batchlm assumes when absent.
MUST_STATE = {
    "llama": (),
    "mistral": ("sliding_window",),  # MistralConfig defaults to a 4096-token window
    "qwen2": (),
    "qwen3": ("head_dim",),  # Qwen3Config defaults head_dim to 128, not hidden / heads
}
# Qwen config classes turn a stated window off unless use_sliding_window is true; batchlm's reader
# honours a window unless use_sliding_window is false, so the flag must be stated beside a window.
WINDOW_NEEDS_FLAG = ("qwen2", "qwen3")


class ConfigView(SimpleNamespace):
    """The fields of one config.json (overrides applied) as attributes; absent fields raise
    AttributeError, so `getattr(config, name, default)` behaves as with a transformers config."""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def read_config_view(model_dir: Path, overrides: dict[str, Any] | None = None) -> ConfigView | None:
    """A view of model_dir/config.json when it reads the same as transformers' config, else None
    (also for a missing or unreadable file: the transformers path then reports the problem)."""
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    raw.update(overrides or {})
    return ConfigView(**raw) if _reads_the_same(raw) else None


def _reads_the_same(raw: dict[str, Any]) -> bool:
    model_type = raw.get("model_type")
    architectures = raw.get("architectures")
    if model_type not in MUST_STATE or not isinstance(architectures, list) or not architectures:
        return False
    if architectures[0] not in MODEL_REGISTRY:
        return False
    if not all(_positive_int(raw.get(name)) for name in REQUIRED_SIZES):
        return False
    if not _positive_number(raw.get("rms_norm_eps")) or not _optional_rope(raw):
        return False
    if any(name not in raw for name in MUST_STATE[model_type]):
        return False
    if raw.get("head_dim") is not None and not _positive_int(raw["head_dim"]):
        return False
    if model_type in WINDOW_NEEDS_FLAG and raw.get("sliding_window") and "use_sliding_window" not in raw:
        return False
    if model_type in WINDOW_NEEDS_FLAG and raw.get("use_sliding_window") and not _window_layers_stated(raw):
        return False
    return all(
        isinstance(raw.get(flag, False), bool)
        for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings")
    )


def _window_layers_stated(raw: dict[str, Any]) -> bool:
    # Which layers use the window: Qwen config classes default max_window_layers to 28.
    return isinstance(raw.get("layer_types"), list) or _positive_int(raw.get("max_window_layers"))


def _optional_rope(raw: dict[str, Any]) -> bool:
    theta = raw.get("rope_theta")
    if theta is not None and not _positive_number(theta):
        return False
    if raw.get("rope_scaling") is not None and raw.get("rope_parameters") is not None:
        # transformers takes rope_scaling over rope_parameters (an old-style edit of a new config).
        return False
    return all(
        raw.get(name) is None or isinstance(raw[name], dict) for name in ("rope_scaling", "rope_parameters")
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
