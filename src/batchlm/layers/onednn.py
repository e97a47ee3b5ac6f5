"""float32 matmuls on the CPU through oneDNN with a pre-converted weight, where it beats the BLAS path.

For a projection with a huge output dimension (the LM head: hidden -> vocabulary) and the few rows of
a decode step, torch's default BLAS splits the work poorly across threads; oneDNN with the weight
converted once to its own tensor format was faster on a 2-core CPU (the A/B is in the git history of
BENCHMARKS.md). It serves only where our packed-GEMM kernel is missing. The conversion is a copy made after loading, so the weight must not change afterwards.
Results differ from torch's matmul by float32 rounding (another summation order), not by more.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@functools.cache
def onednn_matmul_works() -> bool:
    """True when this torch build runs oneDNN linears and a probe agrees with F.linear."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 16, generator=generator)
        x = torch.randn(3, 16, generator=generator)
        probe = _linear(x, weight.to_mkldnn())
        return bool(torch.allclose(probe, F.linear(x, weight), atol=1e-5, rtol=1e-5))
    except RuntimeError as error:  # an op present but unusable on this CPU or build
        logger.info("oneDNN linear unavailable (%s); using torch's default matmul", error)
        return False


def to_onednn_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN copy of a [out, in] float32 CPU weight, or None where the fast path does not apply."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    if not onednn_matmul_works():
        return None
    return weight.detach().contiguous().to_mkldnn()


def onednn_linear(x: torch.Tensor, onednn_weight: torch.Tensor) -> torch.Tensor:
    """x @ W^T for x [N, in] float32 on the CPU and W from to_onednn_weight: [N, out], a dense tensor."""
    return _linear(x.contiguous(), onednn_weight)


def _linear(x: torch.Tensor, onednn_weight: torch.Tensor) -> torch.Tensor:
    # The op inductor uses for its CPU linears: (input, weight, bias, post-op, post-op scalars, algorithm).
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, onednn_weight, None, "none", [], "")
    return out
