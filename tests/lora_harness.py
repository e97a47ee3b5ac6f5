"""What the LoRA adapter tests share: a PEFT-format adapter written to disk (random factors for
modules of the tiny Llama), a model loaded on the CPU with or without one merged, and the check that
it generates as transformers' model with the same deltas added does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from batchlm.models.loader import LoadedModel, load_model
from models_harness import assert_greedy_matches_hf

CPU = torch.device("cpu")
RANK, ALPHA = 4, 8
# HF module name -> (out_features, in_features) in the tiny Llama (hidden 64, 4 x 16 q, 2 x 16 kv, mlp 128).
TARGETS = {
    "model.layers.0.self_attn.q_proj": (64, 64),
    "model.layers.0.self_attn.v_proj": (32, 64),
    "model.layers.1.mlp.gate_proj": (128, 64),
    "model.layers.1.mlp.down_proj": (64, 128),
}


def write_adapter(
    path: Path,
    targets: dict[str, tuple[int, int]] = TARGETS,
    config: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT-format adapter on disk; returns {module: (A, B)}."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors, pairs = {}, {}
    for module, (out_features, in_features) in targets.items():
        a = torch.randn(RANK, in_features, generator=gen) * 0.3
        b = torch.randn(out_features, RANK, generator=gen) * 0.3
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        pairs[module] = (a, b)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets}),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "fan_in_fan_out": False,
        **(config or {}),
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    return pairs


def load(path: Path, adapter: Path | None = None) -> LoadedModel:
    """The model at `path` in float32 on the CPU, with the adapter at `adapter` merged where given."""
    return load_model(
        path, torch.float32, CPU, adapter_path=str(adapter) if adapter else None, progress=False
    )


def base_tensor(base_dir: Path, module: str) -> torch.Tensor:
    return load_file(str(base_dir / "model.safetensors"))[f"{module}.weight"]


def add_tensors(adapter: Path, extra: dict[str, torch.Tensor]) -> None:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({**tensors, **extra}, str(adapter / "adapter_model.safetensors"))


def merged_hf(base: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """transformers' model of `base` with B @ A added to each module's weight (PEFT's merge)."""
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            hf.get_submodule(module).weight += ALPHA / RANK * b @ a
    return hf


def assert_generates_as(loaded: LoadedModel, hf: Any) -> None:
    prompt = [5, 17, 42, 99, 3, 250, 7]
    assert_greedy_matches_hf(loaded, hf, [prompt], 12)
