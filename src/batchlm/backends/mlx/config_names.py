"""Config fields that mlx-lm's model classes read under their older names.

transformers 5 writes `rope_parameters` (holding rope_theta, the RoPE scaling and a partial rotation's
share) and, for Qwen3-MoE, `num_local_experts`; most of mlx-lm's ModelArgs read `rope_theta`,
`rope_scaling`, `partial_rotary_factor` and `num_experts`,
and either fail without them or fall back to a default that may not be the checkpoint's (without
`rope_scaling`, plain RoPE: a Llama 3.1 or linear / YaRN-scaled checkpoint gave other logits than the
torch backend's). Stating the old names beside the new ones serves both. A multimodal config (Mistral
3) gets them in its `text_config`, which mlx-lm builds the language model from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def older_field_names(model_dir: Path) -> dict[str, Any]:
    """The old-named fields config.json lacks but can be derived from its new-named ones."""
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    fields = _derived_fields(raw)
    text = raw.get("text_config")
    if isinstance(text, dict) and (text_fields := _derived_fields(text)):
        # mlx-lm merges overrides into the top level only: the nested config is given whole.
        fields["text_config"] = {**text, **text_fields}
    return fields


def _derived_fields(raw: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    rope = raw.get("rope_parameters")
    if "rope_theta" not in raw and isinstance(rope, dict) and "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    if "rope_scaling" not in raw and isinstance(rope, dict) and (scaling := _rope_scaling(rope)):
        fields["rope_scaling"] = scaling
    if "partial_rotary_factor" not in raw and isinstance(rope, dict) and "partial_rotary_factor" in rope:
        # GLM-4's half-head rotation, which mlx-lm's module requires (Phi-3's defaults to the whole head).
        fields["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if raw.get("model_type") == "qwen3_moe" and "num_experts" not in raw and "num_local_experts" in raw:
        fields["num_experts"] = raw["num_local_experts"]
    return fields


def _rope_scaling(rope: dict[str, Any]) -> dict[str, Any] | None:
    """transformers 4's `rope_scaling` for a flat `rope_parameters` that scales RoPE (None for plain
    RoPE and for per-layer-type parameters, which families.py maps). Both spellings of the type are
    given: mlx-lm's Phi-3 reads `type`, its initialize_rope either."""
    if any(isinstance(value, dict) for value in rope.values()):
        return None
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "default":
        return None
    scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
    return {**scaling, "type": rope_type, "rope_type": rope_type}
