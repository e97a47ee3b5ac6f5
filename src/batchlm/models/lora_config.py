"""A PEFT LoRA adapter's adapter_config.json: read once, its settings checked (what batchlm cannot
honour is refused by name, unknown switches refused, bookkeeping ignored with a warning), and its
ranks and alphas per module (models/lora.py merges the tensors)."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# LoraConfig's lora_alpha when adapter_config.json leaves it out (whatever r is).
PEFT_DEFAULT_ALPHA = 8
# adapter_config.json settings we cannot honour, with the value that means "feature unused".
UNSUPPORTED_SETTINGS: dict[str, tuple[Any, str]] = {
    # Named before the rest: PEFT writes patterns of its own beside the expert parameters it adapts.
    "target_parameters": (
        None,
        "target_parameters (LoRA on raw parameters, as PEFT adapts MoE experts and routers)",
    ),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D-style weights)"),
    "lora_bias": (False, "lora_bias (a bias on lora_B)"),
    "use_qalora": (False, "QALoRA"),
    "layer_replication": (None, "layer_replication"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
    "use_bdlora": (None, "BD-LoRA (use_bdlora, block-diagonal factors)"),
    "kasa_config": (None, "KaSA (kasa_config)"),
    "arrow_config": (None, "Arrow routing (arrow_config)"),
    "monteclora_config": (None, "MonteCLoRA (monteclora_config)"),
}
# Settings that leave the merged weights as the saved tensors and the settings above make them:
# bookkeeping, training-only options, which modules were adapted (the tensors say so) and how they
# were initialised.
NEUTRAL_SETTINGS = frozenset(
    {
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
        "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
        "bias", "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config",
        "lora_ga_config", "megatron_config", "megatron_core", "qalora_group_size", "runtime_config",
        "ensure_weight_tying", "trainable_token_indices", "use_dora", "unsloth_fixed", "unsloth_version",
        "velora_config",  # VeLoRA changes only the backward pass
    }
)  # fmt: skip
# How PEFT names the switches of LoRA variants (use_dora, kasa_config, lora_bias...): an unknown
# setting named so is refused; others (trainers' bookkeeping such as unsloth_version) are ignored.
VARIANT_SETTING = re.compile(r"^use_|_config$|lora")
# init_lora_weights values whose initialisation rewrites the base weights (W - B0 @ A0 and the like):
# such an adapter belongs to the base model PEFT saved with it, unless PEFT converted it (which
# writes init_lora_weights=true).
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


@dataclass(frozen=True)
class RankSettings:
    """adapter_config.json's ranks and alphas: r and lora_alpha, overridden per module by the first
    rank_pattern / alpha_pattern key that matches the end of its name (as PEFT matches them)."""

    rank: int | None  # None: the config does not state r
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def expected_rank(self, module: str) -> tuple[int | None, str]:
        """The rank the config gives `module`, and where it says so (for error messages)."""
        key = _pattern_key(self.rank_pattern, module)
        if key is not None:
            return self.rank_pattern[key], f"rank_pattern[{key!r}]={self.rank_pattern[key]}"
        return self.rank, f"r={self.rank}"

    def scale(self, module: str, rank: int) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        alpha = self.alpha_pattern[key] if key is not None else self.alpha
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # A key matches a module named by it, or whose name ends with "." and the key (a regex).
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def rank_settings(root: Path, config: dict[str, Any]) -> RankSettings:
    def number(value: Any, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"LoRA adapter {root}: {what} must be a number, got {value!r}")
        return float(value)

    def rank(value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"LoRA adapter {root}: {what} must be a positive integer, got {value!r}")
        return value

    def pattern(name: str) -> dict[str, Any]:
        value = config.get(name) or {}
        if not isinstance(value, dict):
            raise ValueError(f"LoRA adapter {root}: {name} must map module patterns to values")
        for key in value:
            try:
                re.compile(key)
            except re.error as error:
                raise ValueError(
                    f"LoRA adapter {root}: {name} key {key!r} is not a regex ({error})"
                ) from None
        return value

    stated_rank = config.get("r")
    return RankSettings(
        rank=None if stated_rank is None else rank(stated_rank, "r"),
        alpha=number(config.get("lora_alpha", PEFT_DEFAULT_ALPHA), "lora_alpha"),
        rslora=bool(config.get("use_rslora", False)),
        rank_pattern={k: rank(v, f"rank_pattern[{k!r}]") for k, v in pattern("rank_pattern").items()},
        alpha_pattern={k: number(v, f"alpha_pattern[{k!r}]") for k, v in pattern("alpha_pattern").items()},
    )


def read_adapter_config(root: Path, given: str) -> dict[str, Any]:
    config_path = root / "adapter_config.json"
    if not root.is_dir():
        if not root.exists() and _looks_like_hub_id(given):
            raise ValueError(
                f"LoRA adapter {given!r} is not a local directory; adapters are not downloaded from the "
                f"Hugging Face Hub: fetch it first (hf download {given} --local-dir DIR) "
                "and pass DIR"
            )
        raise ValueError(f"LoRA adapter {root} is not a directory (expected a PEFT adapter directory)")
    if not config_path.is_file():
        hint = (
            ": it holds config.json, a full model? Pass a model as --model; the adapter path takes a "
            "PEFT adapter directory"
            if (root / "config.json").is_file()
            else " (expected a PEFT adapter directory)"
        )
        raise ValueError(f"LoRA adapter {root} has no adapter_config.json{hint}")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise ValueError(f"LoRA adapter {root}: adapter_config.json is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {root}: adapter_config.json must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"adapter {root} is a {peft_type} adapter; only LoRA is supported")
    for key, (unused, feature) in UNSUPPORTED_SETTINGS.items():
        if not _unset(config.get(key, unused), unused):
            raise ValueError(f"LoRA adapter {root} uses {feature}, which batchlm does not support")
    unknown = sorted(
        key
        for key in config
        if key not in NEUTRAL_SETTINGS | UNSUPPORTED_SETTINGS.keys() and not _unset(config[key])
    )
    variants = [key for key in unknown if VARIANT_SETTING.search(key)]
    if variants:
        settings = ", ".join(f"{key}={config[key]!r}" for key in variants)
        raise ValueError(
            f"LoRA adapter {root}: adapter_config.json sets {settings}, unknown to batchlm; it may change "
            "what the adapter computes, so the adapter is refused (a newer PEFT feature?)"
        )
    if unknown:
        logger.warning(
            "LoRA adapter %s: ignoring adapter_config.json settings unknown to batchlm: %s",
            root,
            ", ".join(f"{key}={config[key]!r}" for key in unknown),
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        logger.warning(
            "LoRA adapter %s was initialised with init_lora_weights=%r, which rewrites the base weights: "
            "it gives the trained outputs only on the base model PEFT saved with it. For the original "
            "base model convert it to plain LoRA (PEFT's save_pretrained with "
            "path_initial_model_for_weight_conversion)",
            root,
            init,
        )
    return config


def _unset(value: Any, unused: Any = None) -> bool:
    return value in (unused, None, False, {}, [], "")


def _looks_like_hub_id(given: str) -> bool:
    # "owner/name": what the model argument would take as a hub repository.
    owner, _, name = given.partition("/")
    return bool(owner and name) and "/" not in name and not given.startswith((".", "~")) and ":" not in given
