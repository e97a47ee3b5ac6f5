"""gpt-oss (gpt-oss-20b, gpt-oss-120b): Llama-style attention with q/k/v/o biases and a learned sink
logit per head, sliding-window and full layers as `layer_types` says, YaRN RoPE; every MLP a mixture
of experts whose router and experts have biases and whose experts apply a clamped SwiGLU; norms whose
weight multiplies in float32.

transformers keeps each layer's experts stacked and transposed: gate_up_proj [E, H, 2I] with each
expert's gate and up columns interleaved (gate at even, up at odd indices), down_proj [E, I, H], and
the bias gate_up_proj_bias [E, 2I] interleaved alike. They load into our stacks (gate rows, then up
rows) through `experts_in_our_layout`, so every experts path keeps its layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any, ClassVar

import torch

from batchlm.layers.norm import Float32WeightRMSNorm
from batchlm.layers.quantization.base import LoadedWeight, as_dense
from batchlm.models.hf_config import field_of
from batchlm.models.llama import BlockOptions
from batchlm.models.model_config import ModelConfig
from batchlm.models.moe import MoEForCausalLM
from batchlm.models.moe_config import MoEConfig, read_gpt_oss

# Where a checkpoint's stacked expert tensors live, and those stored transposed ([E, in, out]).
_EXPERTS = ".mlp.experts"
_TRANSPOSED = ("gate_up_proj", "down_proj")


class GptOssForCausalLM(MoEForCausalLM):
    """gpt-oss's decoder: MoEForCausalLM with sinks on every layer's attention, a router named `router`,
    and experts loaded from transformers' transposed, interleaved stacks."""

    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ((".mlp.router.", ".mlp.gate."),)

    @classmethod
    def read_config(cls, hf_config: Any) -> ModelConfig:
        _refuse_mxfp4(hf_config)
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
        return super().checkpoint_tensors(experts_in_our_layout(weights))


def experts_in_our_layout(
    weights: Iterable[tuple[str, LoadedWeight]],
) -> Iterator[tuple[str, LoadedWeight]]:
    """The checkpoint's tensors, its stacked expert tensors turned into our stacks' layout."""
    for name, tensor in weights:
        prefix, _, param = name.rpartition(".")
        if not prefix.endswith(_EXPERTS):
            yield name, tensor
        elif param in _TRANSPOSED:
            yield name, expert_rows(param, _dense(tensor).transpose(1, 2))
        elif param == "gate_up_proj_bias":
            yield name, _gate_then_up(_dense(tensor), dim=1)
        else:
            yield name, tensor


def expert_rows(param: str, rows: LoadedWeight) -> LoadedWeight:
    """One layer's expert stack with each expert's output rows first ([E, out, in]: gate_up_proj
    [E, 2I, H], its gate and up rows interleaved, or down_proj [E, H, I]) in our layout: gate rows,
    then up rows. A decoded MXFP4 stack (stored [E, out, in]) enters here too."""
    return _gate_then_up(_dense(rows), dim=1) if param == "gate_up_proj" else rows


def _dense(tensor: LoadedWeight) -> torch.Tensor:
    # A bf16 checkpoint's tensors are dense already; a quantized stack is made dense in float32 (cast to
    # the model's dtype as it loads).
    return tensor if isinstance(tensor, torch.Tensor) else as_dense(tensor, torch.float32)


def _gate_then_up(interleaved: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., 2I, ...] with gate and up alternating along `dim` -> the I gates, then the I ups."""
    pairs = interleaved.unflatten(dim, (-1, 2))  # [..., I, 2, ...]: (gate, up) of each index
    return torch.cat([pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)], dim=dim)


def _refuse_mxfp4(hf_config: Any) -> None:
    """The released checkpoints keep their experts in MXFP4, which the loader does not decode yet."""
    quantization = field_of(hf_config, "quantization_config")
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    if str(getattr(method, "value", method)).lower() == "mxfp4":
        raise ValueError(
            "this gpt-oss checkpoint stores its experts in MXFP4 (quantization_config.quant_method "
            "'mxfp4'), which batchlm does not load yet; serve a bf16 checkpoint of the model"
        )
