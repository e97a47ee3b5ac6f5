"""Config fields that mlx-lm's model classes read under their older names.

transformers 5 writes `rope_parameters` (holding rope_theta) and, for Qwen3-MoE, `num_local_experts`;
mlx-lm's ModelArgs read `rope_theta` and `num_experts`, and either fail without them or fall back to
a default that may not be the checkpoint's. Stating the old names beside the new ones serves both.
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
    fields: dict[str, Any] = {}
    rope = raw.get("rope_parameters")
    if "rope_theta" not in raw and isinstance(rope, dict) and "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    if raw.get("model_type") == "qwen3_moe" and "num_experts" not in raw and "num_local_experts" in raw:
        fields["num_experts"] = raw["num_local_experts"]
    return fields
