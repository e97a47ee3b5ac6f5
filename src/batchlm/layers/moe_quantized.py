"""A mixture-of-experts layer's experts kept as quantized blocks for the CPU kernels: a GGUF file's
expert stacks, an FP8 or 4-bit safetensors checkpoint's (cpu_quantized.code_blocks), or dense experts
quantized to Q8_0 under --quantization int8 and fp8 or to 4-bit blocks under w4a16: dense float32
experts take four bytes a weight.

Each expert's gate/up ([2 * I, H], gate rows first) and down ([H, I]) projections become one
QuantizedStore each, packed for the kernels as soon as the expert's three parts have loaded, so the
load-time code arrays of one expert at a time are resident rather than the whole model's."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from batchlm.kernels.cpu_moe import SILU, ExpertActivation, ExpertsKernel, experts_kernel_available
from batchlm.kernels.cpu_quant import quant_linear
from batchlm.layers.activation import ClampedSwiGLU, SiluAndMul
from batchlm.layers.moe_routing import RoutingChoice, sort_by_expert
from batchlm.layers.quantization.base import LoadedWeight
from batchlm.layers.quantization.cpu_quantized import QuantizedStore, code_blocks

# The three projections of an expert, as layers/moe.py numbers them.
GATE, UP, DOWN = 0, 1, 2


def kernel_activation(act_fn: nn.Module) -> ExpertActivation | None:
    """The experts kernel's form of a gated activation, None where it has none (GELU)."""
    if isinstance(act_fn, SiluAndMul):
        return SILU
    if isinstance(act_fn, ClampedSwiGLU):
        return ExpertActivation.clamped_swiglu(act_fn.alpha, act_fn.limit)
    return None


class QuantizedExperts:
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: ExpertActivation | None,
        dense_bits: int = 8,
    ) -> None:
        self.inter = intermediate_size
        self.dense_bits = dense_bits  # dense experts' code width (cpu_quantized.code_blocks)
        # All of a step's experts in one kernel call where it computes their activation (`activation`,
        # kernel_activation's), else one expert a call.
        self.kernel: ExpertsKernel | None = None
        if activation is not None and experts_kernel_available():
            self.kernel = ExpertsKernel(activation)
        # The experts' kernel takes each weight in one form: a gate/up of two widths widens.
        self.gate_up = [
            QuantizedStore(2 * intermediate_size, hidden_size, keep_parts=False) for _ in range(num_experts)
        ]
        self.down = [
            QuantizedStore(hidden_size, intermediate_size, keep_parts=False) for _ in range(num_experts)
        ]
        self._loaded: list[set[int]] = [set() for _ in range(num_experts)]

    def put(self, expert: int, part: int, loaded: LoadedWeight) -> None:
        """One projection of one expert (shape checked by the caller)."""
        if part == DOWN:
            self.down[expert].put(0, code_blocks(loaded, self.dense_bits))
        else:
            self.gate_up[expert].put(part * self.inter, code_blocks(loaded, self.dense_bits))
        self._loaded[expert].add(part)
        if len(self._loaded[expert]) == 3:
            self.gate_up[expert].finish()
            self.down[expert].finish()

    def forward(
        self,
        x: torch.Tensor,
        choice: RoutingChoice,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        gate_up_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each token's routing-weighted sum of its chosen experts' down(act(gate_up(x) + bias)), [T, H]
        (gate_up_bias: [E, 2 * I] where the experts have one, gpt-oss's; a down bias is the caller's).
        On the kernel, act is the activation it was built with (act_fn's kernel_activation)."""
        runs = sort_by_expert(choice, len(self.gate_up))
        slot_tokens, slot_weights = runs.tokens, runs.weights.float()
        used = [(expert, count) for expert, count in enumerate(runs.counts) if count]
        if self.kernel is not None:
            starts = list(itertools.accumulate((count for _, count in used), initial=0))
            weights = [(self.gate_up[e].finish_whole(), self.down[e].finish_whole()) for e, _ in used]
            biases = None
            if gate_up_bias is not None:
                every_bias = gate_up_bias.float().contiguous()
                biases = [every_bias[e] for e, _ in used]
            out = self.kernel.run(
                x.float().contiguous(), starts, slot_tokens, slot_weights.contiguous(), weights, biases
            )
            return out.to(x.dtype)
        rows = x[slot_tokens].float()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in used:
            end = start + count
            gate_up = quant_linear(rows[start:end], self.gate_up[expert].finish())
            if gate_up_bias is not None:
                gate_up += gate_up_bias[expert].float()
            activated = act_fn(gate_up)
            part = quant_linear(activated, self.down[expert].finish()) * slot_weights[start:end, None]
            out.index_add_(0, slot_tokens[start:end], part.to(x.dtype))
            start = end
        return out
