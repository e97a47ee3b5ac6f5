"""gpt-oss (gpt-oss-20b, gpt-oss-120b): Llama-style attention with q/k/v/o biases and a learned sink
logit per head, sliding-window and full layers as `layer_types` says, YaRN RoPE; every MLP a mixture
of experts whose router and experts have biases and whose experts apply a clamped SwiGLU; norms whose
weight multiplies in float32.

transformers keeps each layer's experts stacked and transposed: gate_up_proj [E, H, 2I] with each
expert's gate and up columns interleaved (gate at even, up at odd indices), down_proj [E, I, H], and
the bias gate_up_proj_bias [E, 2I] interleaved alike. They load into our stacks (gate rows, then up
rows) through `experts_in_our_layout`, so every experts path keeps its layout.

The released checkpoints (quantization_config quant_method "mxfp4") store the experts instead as MXFP4
pairs, `gate_up_proj_blocks` / `_scales` ([E, 2I, H / 32, 16] / [E, 2I, H / 32], each expert's [2I, H]
weight with gate and up rows interleaved) and `down_proj_blocks` / `_scales` (each [H, I]), beside bf16
biases and other weights. Each pair is decoded to GGUF MXFP4 blocks (models/mxfp4_weights.py) and
reaches the experts one projection of one expert at a time, still blocks: the quantized CPU experts
keep them so, the dense stacks (a GPU) dequantize them as they load.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any, ClassVar

import torch

from batchlm.layers.norm import Float32WeightRMSNorm
from batchlm.layers.quantization.base import LoadedWeight, QuantizedTensor, as_dense
from batchlm.models.llama import BlockOptions
from batchlm.models.model_config import ModelConfig
from batchlm.models.moe import MoEForCausalLM
from batchlm.models.moe_config import MoEConfig, read_gpt_oss
from batchlm.models.mxfp4_weights import mxfp4_expert_weights
from batchlm.models.quantized_checkpoint import MXFP4_STACKS

# Where a checkpoint's stacked expert tensors live, and those stored transposed ([E, in, out]).
_EXPERTS = ".mlp.experts"
_TRANSPOSED = ("gate_up_proj", "down_proj")
# The two tensors of an MXFP4 stack: `<stack>_blocks` and `<stack>_scales`.
_MXFP4_HALVES = ("blocks", "scales")


class GptOssForCausalLM(MoEForCausalLM):
    """gpt-oss's decoder: MoEForCausalLM with sinks on every layer's attention, a router named `router`,
    and experts loaded from transformers' transposed, interleaved stacks."""

    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ((".mlp.router.", ".mlp.gate."),)
    loads_mxfp4_experts: ClassVar[bool] = True

    @classmethod
    def read_config(cls, hf_config: Any) -> ModelConfig:
        config = super().read_config(hf_config)
        with_sinks = tuple(
            replace(layer, attention=replace(layer.attention, sinks=True)) for layer in config.layers
        )
        return replace(config, layers=with_sinks)

    @classmethod
    def read_moe(cls, hf_config: Any) -> MoEConfig:
        return read_gpt_oss(hf_config)

    @classmethod
    def block_options(cls, config: ModelConfig) -> BlockOptions:
        bias = config.attention_bias
        return BlockOptions(qkv_bias=bias, o_bias=bias, norm=Float32WeightRMSNorm)

    def checkpoint_tensors(
        self, weights: Iterable[tuple[str, LoadedWeight]]
    ) -> Iterable[tuple[str, LoadedWeight]]:
        device = next(p.device for p in self.parameters() if not p.is_meta)
        return super().checkpoint_tensors(experts_in_our_layout(weights, device))


def experts_in_our_layout(
    weights: Iterable[tuple[str, LoadedWeight]], device: torch.device | None = None
) -> Iterator[tuple[str, LoadedWeight]]:
    """The checkpoint's tensors, its stacked expert tensors turned into our stacks' layout. An MXFP4
    checkpoint's `<stack>_blocks` / `<stack>_scales` pairs (either first, from any shards: the first
    waits for its partner) become each expert's projections, still MXFP4 blocks, reordered on
    `device` (the model's: a GPU's loads move the bytes once, and the host only reads them)."""
    waiting: dict[str, dict[str, LoadedWeight]] = {}
    for name, tensor in weights:
        prefix, _, param = name.rpartition(".")
        stack, _, half = param.rpartition("_")
        if not prefix.endswith(_EXPERTS):
            yield name, tensor
        elif stack in MXFP4_STACKS and half in _MXFP4_HALVES:
            pair = waiting.setdefault(f"{prefix}.{stack}", {})
            pair[half] = tensor
            if len(pair) == len(_MXFP4_HALVES):
                del waiting[f"{prefix}.{stack}"]
                yield from mxfp4_expert_projections(prefix, stack, pair["blocks"], pair["scales"], device)
        elif param in _TRANSPOSED:
            rows = _dense(tensor).transpose(1, 2)  # [E, out, in]: each expert's output rows first
            yield name, _gate_then_up(rows, dim=1) if param == "gate_up_proj" else rows
        elif param == "gate_up_proj_bias":
            yield name, _gate_then_up(_dense(tensor), dim=1)
        else:
            yield name, tensor
    for stack, pair in waiting.items():
        (half,) = pair
        raise ValueError(f"the checkpoint has {stack}_{half} but no {stack}_{_partner(half)}")


def mxfp4_expert_projections(
    experts: str, stack: str, blocks: LoadedWeight, scales: LoadedWeight, device: torch.device | None = None
) -> Iterator[tuple[str, QuantizedTensor]]:
    """Each expert's projections of one MXFP4 pair, under the per-expert names the experts router loads
    one by one (`<experts>.<e>.gate_proj.weight`): gate_up_proj's interleaved rows split into its gate
    rows (even) and up rows (odd), every row still its blocks."""
    if not isinstance(blocks, torch.Tensor) or not isinstance(scales, torch.Tensor):
        raise ValueError(f"{experts}.{stack}: MXFP4 blocks and scales must be plain uint8 tensors")
    projections = MXFP4_STACKS[stack]
    if device is not None:
        blocks, scales = blocks.to(device), scales.to(device)
    for expert, weight in enumerate(mxfp4_expert_weights(blocks, scales)):
        for offset, projection in enumerate(projections):
            rows = torch.arange(offset, weight.shape[0], len(projections), device=blocks.device)
            yield f"{experts}.{expert}.{projection}.weight", weight.select_rows(rows)


def _partner(half: str) -> str:
    return _MXFP4_HALVES[1 - _MXFP4_HALVES.index(half)]


def _dense(tensor: LoadedWeight) -> torch.Tensor:
    # A bf16 checkpoint's tensors are dense already; a quantized stack is made dense in float32 (cast to
    # the model's dtype as it loads).
    return tensor if isinstance(tensor, torch.Tensor) else as_dense(tensor, torch.float32)


def _gate_then_up(interleaved: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., 2I, ...] with gate and up alternating along `dim` -> the I gates, then the I ups."""
    pairs = interleaved.unflatten(dim, (-1, 2))  # [..., I, 2, ...]: (gate, up) of each index
    return torch.cat([pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)], dim=dim)
