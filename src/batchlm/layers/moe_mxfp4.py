"""A mixture-of-experts layer's experts kept as MXFP4 on the device that runs them (a GPU): gpt-oss's
released experts, or a GGUF file's MXFP4 expert tensors, at 4.25 bits a weight where dense bf16 stacks
take 16 (gpt-oss-120b's experts fit one 80 GB GPU only so).

The stacks are the grouped GEMM's MXFP4 form (kernels/moe_gemm.Mxfp4Stack). The loader hands each
expert's projection over as GGUF MXFP4 blocks (models/mxfp4_weights.py turns a checkpoint's pairs into
them), which are moved to the device as bytes and reordered there; their values are never rounded.
Where the grouped GEMM is unavailable, each expert's weights are widened as it runs (slow, exact)."""

from __future__ import annotations

import torch

from batchlm.kernels.mxfp4_layout import MXFP4_CODES_PER_BYTE, MXFP4_GROUP, Mxfp4Stack
from batchlm.kernels.quant_blocks import GGUF_BLOCK_BYTES, MXFP4_DOUBLED
from batchlm.layers.moe_quantized import DOWN
from batchlm.layers.quantization.base import LoadedWeight, QuantizedTensor
from batchlm.layers.quantization.registry import MXFP4_QTYPE

# The e2m1 value of each 4-bit code (bit 3 the sign): GGUF's doubled values, halved.
E2M1_VALUES = tuple(float(doubled) / 2 for doubled in MXFP4_DOUBLED)
# A GGUF MXFP4 block: the scale byte, then 16 bytes whose low nibbles are inputs 0..15 and high 16..31.
_GGUF_BLOCK_BYTES = GGUF_BLOCK_BYTES[MXFP4_QTYPE]


def stack_rows(loaded: LoadedWeight, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [rows, K / 2], scales uint8 [rows, K / 32]) in the stacks' layout, on `device`, of
    a [rows, K] GGUF MXFP4 tensor."""
    if not isinstance(loaded, QuantizedTensor) or loaded.qtype != MXFP4_QTYPE:
        kind = loaded.qtype if isinstance(loaded, QuantizedTensor) else type(loaded).__name__
        raise ValueError(f"MXFP4 experts load MXFP4 blocks, not {kind} weights")
    rows, groups = loaded.shape[0], loaded.cols // MXFP4_GROUP
    blocks = loaded.data.to(device).reshape(rows, groups, _GGUF_BLOCK_BYTES)
    packed = blocks[..., 1:]
    values = torch.cat([packed & 0x0F, packed >> 4], dim=-1)  # [rows, groups, 32] in input order
    codes = values[..., 0::2] | (values[..., 1::2] << 4)
    return codes.reshape(rows, groups * MXFP4_GROUP // 2), blocks[..., 0].contiguous()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., K] values of MXFP4 rows (codes [..., K / 2], scales [..., K / 32]), exact in float32 and
    in any dtype with float32's exponent range (bfloat16)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    pairs = torch.stack([table[(codes & 0x0F).long()], table[(codes >> 4).long()]], dim=-1)
    values = pairs.flatten(-2).unflatten(-1, (-1, MXFP4_GROUP))  # [..., K / 32, 32]
    powers = torch.ldexp(torch.ones_like(scales, dtype=torch.float32), scales.int() - 127)
    dense: torch.Tensor = (values * powers.unsqueeze(-1)).flatten(-2)
    return dense.to(dtype)


def _empty_stack(experts: int, rows: int, cols: int, device: torch.device) -> Mxfp4Stack:
    return Mxfp4Stack(
        torch.zeros((experts, rows, cols // MXFP4_CODES_PER_BYTE), dtype=torch.uint8, device=device),
        torch.zeros((experts, rows, cols // MXFP4_GROUP), dtype=torch.uint8, device=device),
    )


class Mxfp4Experts:
    """Every expert's gate/up ([2 * I, H], gate rows first) and down ([H, I]) as one MXFP4 stack each."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, device: torch.device
    ) -> None:
        if hidden_size % MXFP4_GROUP or intermediate_size % MXFP4_GROUP:
            raise ValueError(
                f"MXFP4 experts need whole {MXFP4_GROUP}-input groups: hidden {hidden_size}, "
                f"intermediate {intermediate_size}"
            )
        self.inter = intermediate_size
        self.gate_up = _empty_stack(num_experts, 2 * intermediate_size, hidden_size, device)
        self.down = _empty_stack(num_experts, hidden_size, intermediate_size, device)

    def put(self, expert: int, part: int, loaded: LoadedWeight) -> None:
        """One projection of one expert (shape checked by the caller)."""
        stack, first = (self.down, 0) if part == DOWN else (self.gate_up, part * self.inter)
        codes, scales = stack_rows(loaded, stack.codes.device)
        rows = codes.shape[0]
        stack.codes[expert, first : first + rows].copy_(codes)
        stack.scales[expert, first : first + rows].copy_(scales)

    def fill_random(self, std: float, generator: torch.Generator) -> None:
        """Random codes under one scale for all, whose values have about `std` as their spread (random
        weights in a checkpoint's format, for benchmarks)."""
        mean_square = sum(v * v for v in E2M1_VALUES) / len(E2M1_VALUES)
        exponent = 127 + round(torch.log2(torch.tensor(std / mean_square**0.5)).item())
        for stack in (self.gate_up, self.down):
            stack.codes.random_(0, 256, generator=generator)
            stack.scales.fill_(min(max(exponent, 1), 254))

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's dense (gate_up [2 * I, H], down [H, I]) in `dtype`, widened now."""
        return (
            dequantize(self.gate_up.codes[expert], self.gate_up.scales[expert], dtype),
            dequantize(self.down.codes[expert], self.down.scales[expert], dtype),
        )

    def nbytes(self) -> int:
        return sum(t.numel() for s in (self.gate_up, self.down) for t in (s.codes, s.scales))
