"""PEFT LoRA adapters merged into the base weights at load time: W += scale * B @ A.

scale is lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), with r and lora_alpha taken per module
from rank_pattern / alpha_pattern where they name it. Merging happens on the HF-named tensors as they
stream from the checkpoint, before any fusing or tensor-parallel sharding, so an adapter names the
modules the checkpoint has (Phi-3's fused qkv_proj and gate_up_proj included).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PEFT_PREFIX = "base_model.model."
# adapter_config.json settings we cannot honour, with the value that means "feature unused".
UNSUPPORTED_SETTINGS: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA (use_dora)"),
    # Named before the rest: PEFT writes patterns of its own beside the expert parameters it adapts.
    "target_parameters": (None, "target_parameters (LoRA on raw parameters)"),
    "modules_to_save": (None, "modules_to_save (fully trained extra modules)"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D-style weights)"),
    "lora_bias": (False, "lora_bias (a bias on lora_B)"),
    "use_qalora": (False, "QALoRA"),
    "layer_replication": (None, "layer_replication"),
    "trainable_token_indices": (None, "trainable_token_indices (trained embedding rows)"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
}


@dataclass(frozen=True)
class LoraDelta:
    """One adapted linear layer: delta W = scale * B @ A."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scale: float
    # The base weight the adapter carries itself (PEFT saves an adapted lm_head's), which replaces
    # the checkpoint's; None: the checkpoint's weight.
    base: torch.Tensor | None = None


@dataclass
class LoraAdapter:
    """A loaded adapter: the deltas keyed by the HF name of the weight they modify."""

    path: Path
    deltas: dict[str, LoraDelta]
    # Names merged so far (filled by merge_lora).
    merged: set[str] = field(default_factory=set)

    def check_targets(self, checkpoint_tensor_names: set[str], tied_embeddings: bool) -> None:
        """Fail before loading if the adapter adapts weights the base checkpoint does not have."""
        if tied_embeddings and "lm_head.weight" in self.deltas:
            raise ValueError(
                f"LoRA adapter {self.path}: adapting lm_head of a model with tied embeddings is not supported"
            )
        unknown = sorted(name for name in self.deltas if name not in checkpoint_tensor_names)
        if unknown:
            modules = ", ".join(n.removesuffix(".weight") for n in unknown[:5])
            raise ValueError(
                f"LoRA adapter {self.path} does not match the base model: it adapts module(s) the model lacks: {modules}"
            )


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


def load_lora_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)."""
    root = Path(path)
    settings = _rank_settings(root, _read_adapter_config(root))
    tensors = _read_adapter_tensors(root)
    deltas: dict[str, LoraDelta] = {}
    for module, (a, b, base) in _pair_tensors(root, tensors).items():
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise ValueError(
                f"LoRA adapter {root}: {module} has lora_A rank {rank} but lora_B {list(b.shape)}"
            )
        expected, source = settings.expected_rank(module)
        if expected is not None and rank != expected:
            # PEFT refuses such an adapter; its scale would be computed from the other rank.
            raise ValueError(
                f"LoRA adapter {root}: {module} has rank {rank} but adapter_config.json says {source}"
            )
        deltas[f"{module}.weight"] = LoraDelta(a, b, settings.scale(module, rank), base)
    if not deltas:
        raise ValueError(f"LoRA adapter {root} contains no lora_A/lora_B tensors")
    return LoraAdapter(root, deltas)


def _rank_settings(root: Path, config: dict[str, Any]) -> RankSettings:
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
        alpha=number(config.get("lora_alpha", stated_rank or 8), "lora_alpha"),
        rslora=bool(config.get("use_rslora", False)),
        rank_pattern={k: rank(v, f"rank_pattern[{k!r}]") for k, v in pattern("rank_pattern").items()},
        alpha_pattern={k: number(v, f"alpha_pattern[{k!r}]") for k, v in pattern("alpha_pattern").items()},
    )


def _read_adapter_config(root: Path) -> dict[str, Any]:
    config_path = root / "adapter_config.json"
    if not root.is_dir():
        raise ValueError(f"LoRA adapter {root} is not a directory (expected a PEFT adapter directory)")
    if not config_path.is_file():
        raise ValueError(
            f"LoRA adapter {root} has no adapter_config.json (expected a PEFT adapter directory)"
        )
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
        value = config.get(key, unused)
        if value not in (unused, None, False, {}, []):
            raise ValueError(f"LoRA adapter {root} uses {feature}, which batchlm does not support")
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"LoRA adapter {root} trains biases (bias={config['bias']!r}); only bias='none' is supported"
        )
    return config


def _read_adapter_tensors(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = root / "adapter_model.safetensors"
    if not weights.is_file():
        if (root / "adapter_model.bin").is_file():
            raise ValueError(
                f"LoRA adapter {root} has only adapter_model.bin; batchlm needs adapter_model.safetensors"
            )
        raise ValueError(f"LoRA adapter {root} has no adapter_model.safetensors")
    return load_file(str(weights))


def _pair_tensors(
    root: Path, tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """{HF module name: (A, B, base weight or None)} from PEFT keys like
    base_model.model.<module>.lora_A.weight (and <module>.base_layer.weight, which PEFT saves for an
    adapted lm_head)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        module, kind = _module_and_kind(name)
        if not key.startswith(PEFT_PREFIX) or kind is None:
            raise ValueError(
                f"LoRA adapter {root}: unsupported tensor {key!r} (only lora_A/lora_B weights of linear layers are supported)"
            )
        parts.setdefault(module, {})[kind] = tensor.float()
    incomplete = [module for module, ab in parts.items() if "A" not in ab or "B" not in ab]
    if incomplete:
        raise ValueError(f"LoRA adapter {root}: module {incomplete[0]} lacks its lora_A or lora_B tensor")
    return {module: (ab["A"], ab["B"], ab.get("base")) for module, ab in parts.items()}


def _module_and_kind(name: str) -> tuple[str, str | None]:
    """("model.layers.0.self_attn.q_proj", "A") for its lora_A weight; kind None for other tensors."""
    for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".base_layer.weight", "base")):
        if name.endswith(suffix):
            return name.removesuffix(suffix), kind
    return name, None


def merge_lora(
    weights: Iterable[tuple[str, torch.Tensor]], adapter: LoraAdapter
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the checkpoint tensors with the adapter's deltas added (in float32) where targeted."""
    for name, tensor in weights:
        delta = adapter.deltas.get(name)
        if delta is not None:
            expected = (delta.b.shape[0], delta.a.shape[1])
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"LoRA adapter {adapter.path} does not match the base model: {name} is "
                    f"{list(tensor.shape)} in the model but the adapter's B @ A is {list(expected)}"
                )
            if delta.base is not None:
                if tuple(delta.base.shape) != expected:
                    raise ValueError(
                        f"LoRA adapter {adapter.path}: its own copy of {name} is {list(delta.base.shape)} "
                        f"but the model's is {list(expected)} (a resized vocabulary is not supported)"
                    )
                tensor = delta.base
            tensor = tensor.float() + delta.scale * (delta.b @ delta.a)
            adapter.merged.add(name)
        yield name, tensor
    missed = sorted(set(adapter.deltas) - adapter.merged)
    if missed:
        raise ValueError(
            f"LoRA adapter {adapter.path}: the checkpoint has no tensor {missed[0]!r} to merge into"
        )
