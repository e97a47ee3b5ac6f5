"""A mixture-of-experts layer's experts kept as 4-bit groups on a GPU: a 4-bit checkpoint's experts
(GPTQ without act order, AWQ, compressed-tensors pack-quantized) as stored, or dense ones under
--quantization w4a16 (symmetric round-to-nearest per group of 128), at about a quarter of bf16's
bytes: Qwen3-30B-A3B's experts then fit a 24 GB card.

The stacks are the grouped GEMM's 4-bit form (kernels/int4_stack.Int4Stack), their group size the
checkpoint's (taken from the first projection that loads; groups wider than 128 inputs, a row's
single group included, are held as groups of 128 with the same scale and zero point). Where the
grouped GEMM is unavailable each expert's weights are widened as it runs."""

from __future__ import annotations

import torch

from batchlm.kernels.int4_stack import INT4_CODES_PER_BYTE, Int4Stack
from batchlm.layers.moe_quantized import DOWN
from batchlm.layers.quantization.base import LoadedWeight, as_dense
from batchlm.layers.quantization.forms import Int4Weight
from batchlm.layers.quantization.int4 import DEFAULT_GROUP_SIZE, quantize_int4_groups

# The group sizes the grouped GEMM steps through (a step is one group); wider ones are cut to this.
WIDEST_GROUP = 128
GROUP_SIZES = (32, 64, WIDEST_GROUP)
# The spread of codes drawn uniformly from 0..15 around zero point 8 (random weights).
_UNIFORM_CODE_STD = (((16**2) - 1) / 12) ** 0.5


def int4_groups(loaded: LoadedWeight) -> Int4Weight:
    """An expert projection as 4-bit groups the grouped GEMM can step through: a checkpoint's as
    stored (groups wider than 128 repeated as groups of 128), a dense one quantized per 128 inputs."""
    if not isinstance(loaded, Int4Weight):
        return quantize_int4_groups(as_dense(loaded, torch.float32), DEFAULT_GROUP_SIZE)
    if loaded.input_order is not None:
        # Each expert's own input order: the grouped GEMM reads one input row for every expert.
        raise ValueError(
            "act-order 4-bit experts (GPTQ desc_act, compressed-tensors group actorder) are not supported "
            "on the GPU's 4-bit expert stacks"
        )
    group = loaded.group_size
    if group in GROUP_SIZES:
        return loaded
    if group % WIDEST_GROUP:
        raise ValueError(
            f"4-bit experts take groups of {', '.join(map(str, GROUP_SIZES))} inputs or multiples of "
            f"{WIDEST_GROUP}, not {group}"
        )
    repeat = group // WIDEST_GROUP
    return Int4Weight(
        loaded.codes,
        loaded.scales.repeat_interleave(repeat, dim=1),
        loaded.zeros.repeat_interleave(repeat, dim=1),
        WIDEST_GROUP,
    )


def whole_groups(hidden_size: int, intermediate_size: int) -> bool:
    """Whether experts of these sizes hold whole groups of every size a checkpoint may use (32, 64,
    128, and wider ones held as 128): what 4-bit stacks ask of them."""
    return hidden_size % WIDEST_GROUP == 0 and intermediate_size % WIDEST_GROUP == 0


def _empty_stack(experts: int, rows: int, cols: int, group: int, device: torch.device) -> Int4Stack:
    groups = (experts, rows, cols // group)
    return Int4Stack(
        torch.zeros((experts, rows, cols // INT4_CODES_PER_BYTE), dtype=torch.uint8, device=device),
        torch.zeros(groups, dtype=torch.float32, device=device),
        torch.zeros(groups, dtype=torch.uint8, device=device),
    )


def _unpacked(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes of packed bytes [..., K / 2] (input 2j in byte j's low nibble)."""
    return torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)


class Int4Experts:
    """Every expert's gate/up ([2 * I, H], gate rows first) and down ([H, I]) as one 4-bit stack each,
    allocated when the group size is known (the first projection loaded, or random weights)."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, device: torch.device
    ) -> None:
        self.num_experts = num_experts
        self.hidden, self.inter = hidden_size, intermediate_size
        self.device = device
        self.group_size = 0
        self._gate_up: Int4Stack | None = None
        self._down: Int4Stack | None = None

    @property
    def gate_up(self) -> Int4Stack:
        if self._gate_up is None:
            raise RuntimeError("no 4-bit expert weights have loaded yet")
        return self._gate_up

    @property
    def down(self) -> Int4Stack:
        if self._down is None:
            raise RuntimeError("no 4-bit expert weights have loaded yet")
        return self._down

    def _allocate(self, group: int) -> None:
        if self.hidden % group or self.inter % group:
            raise ValueError(
                f"4-bit experts in groups of {group} inputs need sizes of whole groups: hidden "
                f"{self.hidden}, intermediate {self.inter}"
            )
        self.group_size = group
        self._gate_up = _empty_stack(self.num_experts, 2 * self.inter, self.hidden, group, self.device)
        self._down = _empty_stack(self.num_experts, self.hidden, self.inter, group, self.device)

    def put(self, expert: int, part: int, loaded: LoadedWeight) -> None:
        """One projection of one expert (shape checked by the caller)."""
        weight = int4_groups(loaded)
        if self.group_size == 0:
            self._allocate(weight.group_size)
        elif weight.group_size != self.group_size:
            raise ValueError(
                f"4-bit experts with groups of {weight.group_size} and {self.group_size} inputs in one layer"
            )
        stack, first = (self.down, 0) if part == DOWN else (self.gate_up, part * self.inter)
        rows = slice(first, first + weight.shape[0])
        codes = weight.codes.to(self.device)
        stack.codes[expert, rows].copy_(codes[:, 0::2] | (codes[:, 1::2] << 4))
        stack.scales[expert, rows].copy_(weight.scales)
        stack.zeros[expert, rows].copy_(weight.zeros)

    def fill_random(self, std: float, generator: torch.Generator) -> None:
        """Uniform random codes about zero point 8, in groups of 128 (or the widest whole group),
        scaled so the values spread about `std` (random weights in a 4-bit checkpoint's form)."""
        self._allocate(next(g for g in reversed(GROUP_SIZES) if not (self.hidden % g or self.inter % g)))
        for stack in (self.gate_up, self.down):
            stack.codes.random_(0, 256, generator=generator)
            stack.scales.fill_(std / _UNIFORM_CODE_STD)
            stack.zeros.fill_(8)

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's dense (gate_up [2 * I, H], down [H, I]) in `dtype`, widened now."""
        return self._widened(self.gate_up, expert, dtype), self._widened(self.down, expert, dtype)

    def _widened(self, stack: Int4Stack, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """(code - zero) * scale in float32, rounded to `dtype` (as the grouped GEMM widens a tile)."""
        codes = _unpacked(stack.codes[expert])
        return Int4Weight(codes, stack.scales[expert], stack.zeros[expert], self.group_size).dequantize(dtype)

    def nbytes(self) -> int:
        stacks = (self.gate_up, self.down) if self.group_size else ()
        return sum(t.numel() * t.element_size() for s in stacks for t in (s.codes, s.scales, s.zeros))
