"""FP8 checkpoint weights in our forms: compressed-tensors' e4m3 values with a per-channel or
per-tensor scale as an Fp8Weight, and transformers' block-wise ("fine-grained") FP8, one scale per
2-D block, dequantized to a dense tensor (no kernel of ours takes its scales)."""

from __future__ import annotations

import torch

from batchlm.kernels.fp8_types import FP8_DTYPE
from batchlm.layers.quantization.forms import Fp8Weight

# Values a block-wise FP8 weight dequantizes per step (float32 values and their scales: 128 MiB).
STEP_VALUES = 1 << 24


def fp8_weight(weight: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor | None) -> Fp8Weight:
    """An FP8 weight with a per-channel ([out, 1]) or per-tensor (one value) scale."""
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"an FP8 weight must be stored as float8_e4m3fn, not {weight.dtype}")
    rows = weight.shape[0]
    scale = scale.float().reshape(-1)
    if scale.numel() not in (1, rows):
        raise ValueError(
            f"weight_scale has {scale.numel()} values for {rows} rows (per-channel or per-tensor only)"
        )
    scale = scale.expand(rows).contiguous()
    static = None if input_scale is None else float(input_scale.float().max())
    return Fp8Weight(weight, scale, static)


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """A block-wise FP8 weight [N, K] in `dtype`: w[r, c] = weight[r, c] * scale_inv[r // bn, c // bk].
    The last block of rows or inputs may be partial (N or K not a multiple of the block): the grid
    holds ceil(N / bn) x ceil(K / bk) scales. Done in float32 a few whole block rows at a time (up to
    STEP_VALUES values), so a large weight never exists in float32 beside its result."""
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"a block-wise FP8 weight must be stored as float8_e4m3fn, not {weight.dtype}")
    if not scale_inv.dtype.is_floating_point or scale_inv.element_size() < 2:
        # One-byte scales (ue8m0 exponents) mean something else than their numeric value.
        raise ValueError(f"weight_scale_inv is {scale_inv.dtype}; block-wise FP8 scales must be floats")
    rows, cols = weight.shape
    block_rows, block_cols = block
    grid = (-(-rows // block_rows), -(-cols // block_cols))
    if tuple(scale_inv.shape) != grid:
        raise ValueError(
            f"weight_scale_inv has shape {list(scale_inv.shape)}; a [{rows}, {cols}] weight in blocks of "
            f"{block_rows}x{block_cols} needs {list(grid)}"
        )
    # Each block row's scales, one per input: [grid rows, K].
    column_scales = scale_inv.float().repeat_interleave(block_cols, dim=1)[:, :cols]
    out = torch.empty(rows, cols, dtype=dtype, device=weight.device)
    step = block_rows * max(1, STEP_VALUES // (block_rows * max(cols, 1)))
    for start in range(0, rows, step):
        end = min(rows, start + step)
        scales = column_scales[start // block_rows : -(-end // block_rows)]
        scales = scales.repeat_interleave(block_rows, dim=0)[: end - start]
        out[start:end] = (weight[start:end].float() * scales).to(dtype)
    return out
