"""Phi-3 and Phi-4-mini: the Llama block with checkpoints that store q/k/v and gate/up fused.

The fused tensors are split into the HF part names at load, so they take the same path as every other
family (tensor-parallel sharding, per-part shape checks). Partial rotary, LongRoPE and the sliding
window come from ModelConfig's per-layer specs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from batchlm.layers.quantization.base import LoadedWeight, QuantizedTensor, narrow_rows
from batchlm.models.llama import LlamaForCausalLM
from batchlm.models.model_config import ModelConfig


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 / Phi-3.5 / Phi-4-mini (Phi3ForCausalLM in config.json)."""

    def checkpoint_tensors(
        self, weights: Iterable[tuple[str, LoadedWeight]]
    ) -> Iterable[tuple[str, LoadedWeight]]:
        return split_fused_tensors(weights, self.config)


def split_fused_tensors(
    weights: Iterable[tuple[str, LoadedWeight]], config: ModelConfig
) -> Iterator[tuple[str, LoadedWeight]]:
    """qkv_proj.weight -> q_proj/k_proj/v_proj.weight and gate_up_proj.weight -> gate_proj/up_proj.weight."""
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    for name, tensor in weights:
        prefix, _, leaf = name.rpartition(".")
        module, _, kind = prefix.rpartition(".")
        if kind == "qkv_proj":
            parts = _rows(name, tensor, [q_rows, kv_rows, kv_rows])
            yield from (
                (f"{module}.{part}.{leaf}", t)
                for part, t in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True)
            )
        elif kind == "gate_up_proj":
            half = config.intermediate_size
            parts = _rows(name, tensor, [half, half])
            yield from (
                (f"{module}.{part}.{leaf}", t)
                for part, t in zip(("gate_proj", "up_proj"), parts, strict=True)
            )
        else:
            yield name, tensor


def _rows(name: str, tensor: LoadedWeight, sizes: list[int]) -> tuple[LoadedWeight, ...]:
    """The tensor's row ranges: dense rows, or a GGUF file's block-quantized rows as their bytes."""
    if not isinstance(tensor, torch.Tensor | QuantizedTensor):
        raise ValueError(f"{name}: fused Phi-3 tensors load from dense or GGUF checkpoints only")
    if tensor.shape[0] != sum(sizes):
        raise ValueError(f"{name} has {tensor.shape[0]} rows; the config needs {sum(sizes)} ({sizes})")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return tuple(narrow_rows(tensor, start, size) for start, size in zip(starts, sizes, strict=True))
