"""A mixture-of-experts layer's experts kept as FP8 on a GPU: e4m3 values with one float32 scale per
expert row, half of bf16's bytes (Qwen3-30B-A3B's experts then fit a 48 GB card). The grouped GEMM
widens them with the e4m3 conversion where the GPU has it (Ada, Hopper) and by bit placement before.

They come from an FP8 checkpoint's experts (compressed-tensors FP8, per-channel or per-tensor
scales; a static activation scale is not used, the products run on 16-bit activations), from a
block-wise FP8 checkpoint's (dequantized as they load and requantized per row, as its linears are),
or from dense experts under --quantization fp8. The stacks are the grouped GEMM's FP8 form
(kernels/fp8_stack.Fp8Stack); where it is unavailable each expert's weights are widened as it runs."""

from __future__ import annotations

import torch

from batchlm.kernels.fp8_stack import Fp8Stack
from batchlm.kernels.fp8_types import FP8_DTYPE
from batchlm.layers.moe_quantized import DOWN
from batchlm.layers.quantization.base import LoadedWeight, as_dense
from batchlm.layers.quantization.forms import Fp8Weight, quantize_fp8_rows


def fp8_rows(loaded: LoadedWeight) -> Fp8Weight:
    """An expert projection as FP8 rows: an FP8 checkpoint's as stored, anything else (dense, or
    dequantized as it loaded) quantized with one scale per row."""
    if isinstance(loaded, Fp8Weight):
        return loaded
    return quantize_fp8_rows(as_dense(loaded, torch.float32))


def _widened(stack: Fp8Stack, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """One expert's values times their rows' scales in float32, rounded to `dtype` (as the grouped
    GEMM widens a tile)."""
    return Fp8Weight(stack.values[expert], stack.scales[expert]).dequantize(dtype)


def _empty_stack(experts: int, rows: int, cols: int, device: torch.device) -> Fp8Stack:
    return Fp8Stack(
        torch.zeros((experts, rows, cols), dtype=FP8_DTYPE, device=device),
        torch.zeros((experts, rows), dtype=torch.float32, device=device),
    )


class Fp8Experts:
    """Every expert's gate/up ([2 * I, H], gate rows first) and down ([H, I]) as one FP8 stack each."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, device: torch.device
    ) -> None:
        self.inter = intermediate_size
        self.gate_up = _empty_stack(num_experts, 2 * intermediate_size, hidden_size, device)
        self.down = _empty_stack(num_experts, hidden_size, intermediate_size, device)

    def put(self, expert: int, part: int, loaded: LoadedWeight) -> None:
        """One projection of one expert (shape checked by the caller)."""
        stack, first = (self.down, 0) if part == DOWN else (self.gate_up, part * self.inter)
        rows = fp8_rows(loaded)
        count = rows.shape[0]
        stack.values[expert, first : first + count].copy_(rows.data)
        stack.scales[expert, first : first + count].copy_(rows.scale)

    def fill_random(self, std: float, generator: torch.Generator) -> None:
        """Normal(0, std) weights quantized per row, one expert at a time (random weights in the form
        an FP8 checkpoint's take, for benchmarks)."""
        for stack in (self.gate_up, self.down):
            experts, rows, cols = stack.shape
            for expert in range(experts):
                dense = torch.empty((rows, cols), device=stack.values.device)
                quantized = quantize_fp8_rows(dense.normal_(0.0, std, generator=generator))
                stack.values[expert].copy_(quantized.data)
                stack.scales[expert].copy_(quantized.scale)

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's dense (gate_up [2 * I, H], down [H, I]) in `dtype`, widened now."""
        return _widened(self.gate_up, expert, dtype), _widened(self.down, expert, dtype)

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for s in (self.gate_up, self.down) for t in (s.values, s.scales)
        )
