"""y = x W^T for FP8 (e4m3) weights with one scale per output row, activations quantized to FP8.

On CUDA the product is torch's scaled matmul (cuBLASLt FP8 GEMM, Hopper/Ada) with row-wise scales
on both sides: per-token activation scales [M, 1] and per-channel weight scales [1, N]. Elsewhere
(CPU tests) the same arithmetic is emulated in float32 from the same FP8 codes, so results match
the GPU path up to summation order.
"""

from __future__ import annotations

import torch

from batchlm.kernels.fp8_types import FP8_DTYPE, FP8_MAX


def quantize_activations(
    x: torch.Tensor, static_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [M, K] fp8, scales [M, 1] float32): per-token dynamic scales, or the static one."""
    if x.device.type == "cuda":
        from batchlm.kernels.fp8_quant import per_token_fp8

        return per_token_fp8(x, static_scale)
    values = x.float()
    if static_scale is None:
        scales = values.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    else:
        scales = static_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    codes = (values / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scales.contiguous()


def fp8_linear(
    x: torch.Tensor,  # [..., K] in the model dtype
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale: torch.Tensor,  # [1, N] float32
    input_scale: torch.Tensor | None,  # [1] float32: static activation scale; None = per token
    bias: torch.Tensor | None,
) -> torch.Tensor:
    out_features = weight.shape[0]
    rows = x.reshape(-1, x.shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    codes, scales = quantize_activations(rows, input_scale)
    if x.device.type == "cuda" and rows.shape[0] > 0:
        # Row-wise scaling needs a bfloat16 result; other model dtypes take a cast.
        out = torch._scaled_mm(
            codes, weight.t(), scale_a=scales, scale_b=weight_scale, out_dtype=torch.bfloat16
        )
    else:
        out = (codes.float() @ weight.float().t()) * scales * weight_scale
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out_features)
