"""Route HF-named checkpoint tensors into a model's (possibly fused, sharded) parameters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from batchlm.layers.linear import check_shape
from batchlm.layers.quantization.base import LoadedWeight, as_dense
from batchlm.layers.quantization.layer import MethodLayer
from batchlm.models.base import CausalLM


@dataclass(frozen=True)
class ParamTarget:
    """Where one HF tensor goes: `param_name` of `module`, at `shard` of a fused layer (or None)."""

    module: nn.Module
    param_name: str
    shard: str | int | None


def find_target(model: CausalLM, name: str) -> ParamTarget | None:
    """The parameter an HF tensor name maps to, or None if the model has no such parameter."""
    module_path, _, param_name = name.rpartition(".")
    shard: str | int | None = None
    parent, _, leaf = module_path.rpartition(".")
    for fused, hf_module, shard_id in model.stacked_params:
        if leaf == fused:
            return None  # checkpoints store the parts, never our fused tensor
        if leaf == hf_module:
            module_path, shard = f"{parent}.{fused}" if parent else fused, shard_id
            break
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return None
    method_weight = isinstance(module, MethodLayer) and param_name == "weight"
    if not method_weight and not isinstance(getattr(module, param_name, None), nn.Parameter):
        return None
    return ParamTarget(module, param_name, shard)


def expected_names(model: CausalLM) -> set[str]:
    """HF names of every tensor the model needs (fused parameters expanded; tied ones counted once)."""
    names: set[str] = set()
    for param_path in _param_paths(model):
        module_path, _, param_name = param_path.rpartition(".")
        names.update(f"{name}.{param_name}" for name in hf_module_names(model, module_path))
    return names


def hf_module_names(model: CausalLM, module_path: str) -> list[str]:
    """The HF module names a module of ours loads from (several for a fused one)."""
    parent, _, leaf = module_path.rpartition(".")
    parts = [hf for fused, hf, _ in model.stacked_params if fused == leaf]
    return [".".join(p for p in (parent, hf_module) if p) for hf_module in parts or [leaf]]


def _param_paths(model: CausalLM) -> set[str]:
    # Parameters, plus the weights their methods keep in other forms (a tied LM head counted once).
    paths = {path for path, _ in model.named_parameters()}
    for path, module in model.named_modules():
        if isinstance(module, MethodLayer) and getattr(module, "tied_embedding", None) is None:
            paths.add(f"{path}.weight")
    return paths


def load_tensor(target: ParamTarget, name: str, tensor: LoadedWeight) -> None:
    """Copy `tensor` into the target, through the layer's own loader when it has one."""
    loader = getattr(target.module, "load_weight", None)
    if loader is not None:
        loader(name, target.param_name, tensor, target.shard)
        return
    param = getattr(target.module, target.param_name)
    check_shape(name, tuple(param.shape), tensor.shape)
    with torch.no_grad():
        param.copy_(as_dense(tensor, param.dtype))


def is_ignored(model: CausalLM, name: str) -> bool:
    if any(name.endswith(suffix) for suffix in model.ignored_suffixes):
        return True
    # Some tied checkpoints still store lm_head.weight; the embedding is the one we use.
    return model.tie_word_embeddings and name == "lm_head.weight"


def load_named_weights(
    model: CausalLM, weights: Iterable[tuple[str, LoadedWeight]], checked_elsewhere: Iterable[str] = ()
) -> None:
    """Load every (HF name, tensor) pair; raise ValueError listing unexpected or missing tensors
    (except `checked_elsewhere`: parameters whose loading the caller verifies itself)."""
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in model.checkpoint_tensors(weights):
        if is_ignored(model, name):
            continue
        target = find_target(model, name)
        if target is None:
            unexpected.append(name)
            continue
        load_tensor(target, name, tensor)
        loaded.add(name)
    if unexpected:
        raise ValueError(
            f"unexpected tensor(s) in the checkpoint, not part of the model: {_listing(unexpected)}"
        )
    elsewhere = set(checked_elsewhere) | model.tensors_loaded_elsewhere()
    missing = sorted(expected_names(model) - loaded - elsewhere)
    if missing:
        raise ValueError(f"missing tensor(s): the checkpoint lacks {_listing(missing)}")
    model.check_loaded_elsewhere()


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
