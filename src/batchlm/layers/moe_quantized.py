"""A mixture-of-experts layer's experts kept as quantized blocks for the CPU kernels: a GGUF file's
expert stacks, or dense experts quantized to Q8_0 under --quantization int8: dense float32 experts
take four bytes a weight.

Each expert's gate/up ([2 * I, H], gate rows first) and down ([H, I]) projections become one
QuantizedStore each, packed for the kernels as soon as the expert's three parts have loaded, so the
load-time code arrays of one expert at a time are resident rather than the whole model's."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from batchlm.kernels.cpu_moe import ExpertsKernel, experts_kernel_available
from batchlm.kernels.cpu_quant import quant_linear
from batchlm.layers.quantization.base import LoadedWeight
from batchlm.layers.quantization.cpu_quantized import QuantizedStore, code_blocks

# The three projections of an expert, as layers/moe.py numbers them.
GATE, UP, DOWN = 0, 1, 2


class QuantizedExperts:
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, silu: bool) -> None:
        self.inter = intermediate_size
        # All of a step's experts in one kernel call (SiLU-gated experts only), else one expert a call.
        self.kernel = ExpertsKernel() if silu and experts_kernel_available() else None
        self.gate_up = [QuantizedStore(2 * intermediate_size, hidden_size) for _ in range(num_experts)]
        self.down = [QuantizedStore(hidden_size, intermediate_size) for _ in range(num_experts)]
        self._loaded: list[set[int]] = [set() for _ in range(num_experts)]

    def put(self, expert: int, part: int, loaded: LoadedWeight) -> None:
        """One projection of one expert (shape checked by the caller)."""
        if part == DOWN:
            self.down[expert].put(0, code_blocks(loaded))
        else:
            self.gate_up[expert].put(part * self.inter, code_blocks(loaded))
        self._loaded[expert].add(part)
        if len(self._loaded[expert]) == 3:
            self.gate_up[expert].finish()
            self.down[expert].finish()

    def run(
        self, grouped: torch.Tensor, counts: Sequence[int], act_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """down(act(gate_up(rows))) for float32 rows [n, H] grouped by expert, counts[e] of them for
        expert e, in that order."""
        used = [(expert, count) for expert, count in enumerate(counts) if count]
        if self.kernel is not None:
            starts = list(itertools.accumulate((count for _, count in used), initial=0))
            weights = [(self.gate_up[e].finish(), self.down[e].finish()) for e, _ in used]
            return self.kernel.run(grouped.float().contiguous(), starts, weights).to(grouped.dtype)
        out = torch.empty_like(grouped)
        start = 0
        for expert, count in used:
            rows = grouped[start : start + count]
            activated = act_fn(quant_linear(rows, self.gate_up[expert].finish()))
            out[start : start + count] = quant_linear(activated, self.down[expert].finish())
            start += count
        return out
