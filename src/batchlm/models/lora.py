"""PEFT LoRA adapters merged into the base weights at load time: W += scale * B @ A.

scale is lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). Merging happens on the HF-named
tensors as they stream from the checkpoint, before any fusing or tensor-parallel sharding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PEFT_PREFIX = "base_model.model."
# adapter_config.json settings we cannot honour, with the value that means "feature unused".
UNSUPPORTED_SETTINGS: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA (use_dora)"),
    "modules_to_save": (None, "modules_to_save (fully trained extra modules)"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D-style weights)"),
    "alpha_pattern": ({}, "per-module alpha_pattern"),
    "lora_bias": (False, "lora_bias (a bias on lora_B)"),
    "use_qalora": (False, "QALoRA"),
    "layer_replication": (None, "layer_replication"),
    "trainable_token_indices": (None, "trainable_token_indices (trained embedding rows)"),
    "target_parameters": (None, "target_parameters (LoRA on raw parameters)"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
}


@dataclass(frozen=True)
class LoraDelta:
    """One adapted linear layer: delta W = scale * B @ A."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scale: float


@dataclass
class LoraAdapter:
    """A loaded adapter: the deltas keyed by the HF name of the weight they modify."""

    path: Path
    deltas: dict[str, LoraDelta]
    # Names merged so far (filled by merge_lora).
    merged: set[str] = field(default_factory=set)

    def check_targets(self, model_tensor_names: set[str], tied_embeddings: bool) -> None:
        """Fail before loading if the adapter adapts weights the base model does not have."""
        if tied_embeddings and "lm_head.weight" in self.deltas:
            raise ValueError(
                f"LoRA adapter {self.path}: adapting lm_head of a model with tied embeddings is not supported"
            )
        unknown = sorted(name for name in self.deltas if name not in model_tensor_names)
        if unknown:
            modules = ", ".join(n.removesuffix(".weight") for n in unknown[:5])
            raise ValueError(
                f"LoRA adapter {self.path} does not match the base model: it adapts module(s) the model lacks: {modules}"
            )


def load_lora_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)."""
    root = Path(path)
    config = _read_adapter_config(root)
    tensors = _read_adapter_tensors(root)
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    rslora = bool(config.get("use_rslora", False))
    deltas: dict[str, LoraDelta] = {}
    for module, (a, b) in _pair_tensors(root, tensors).items():
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise ValueError(
                f"LoRA adapter {root}: {module} has lora_A rank {rank} but lora_B {list(b.shape)}"
            )
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        deltas[f"{module}.weight"] = LoraDelta(a, b, scale)
    if not deltas:
        raise ValueError(f"LoRA adapter {root} contains no lora_A/lora_B tensors")
    return LoraAdapter(root, deltas)


def _read_adapter_config(root: Path) -> dict[str, Any]:
    config_path = root / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(
            f"LoRA adapter {root} has no adapter_config.json (expected a PEFT adapter directory)"
        )
    config: dict[str, Any] = json.loads(config_path.read_text())
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
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{HF module name: (A, B)} from PEFT keys like base_model.model.<module>.lora_A.weight."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or kind not in ("A.weight", "B.weight"):
            raise ValueError(
                f"LoRA adapter {root}: unsupported tensor {key!r} (only lora_A/lora_B weights of linear layers are supported)"
            )
        parts.setdefault(module, {})[kind[0]] = tensor.float()
    incomplete = [module for module, ab in parts.items() if len(ab) != 2]
    if incomplete:
        raise ValueError(f"LoRA adapter {root}: module {incomplete[0]} lacks its lora_A or lora_B tensor")
    return {module: (ab["A"], ab["B"]) for module, ab in parts.items()}


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
            tensor = tensor.float() + delta.scale * (delta.b @ delta.a)
            adapter.merged.add(name)
        yield name, tensor
    missed = sorted(set(adapter.deltas) - adapter.merged)
    if missed:
        raise ValueError(
            f"LoRA adapter {adapter.path}: the checkpoint has no tensor {missed[0]!r} to merge into"
        )
