"""Start-up compiles Triton kernels concurrently: a dry pass notes the variants it meets uncompiled
(launching nothing), they compile on a thread pool, and the real launches then compile nothing."""

from __future__ import annotations

import pytest
import torch
from devices import require_cuda

from batchlm.kernels.parallel_compile import compile_deferred, defer_compiles

pytestmark = pytest.mark.gpu

require_cuda()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, FACTOR: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * FACTOR, mask=mask)


def _scale(x: torch.Tensor, out: torch.Tensor, factor: int) -> None:
    _scale_kernel[(triton.cdiv(x.numel(), 128),)](x, out, x.numel(), FACTOR=factor, BLOCK=128)


def test_dry_pass_notes_variants_then_they_compile_together_and_launch_without_compiling() -> None:
    x = torch.arange(1000, dtype=torch.float32, device="cuda")
    out = torch.zeros_like(x)
    factors = (3, 5, 7)  # three variants (FACTOR is a constexpr), none compiled in this process yet
    with defer_compiles() as deferred:
        assert deferred is not None
        for factor in factors:
            _scale(x, out, factor)
        _scale(x, out, 3)  # the same variant again is noted once
    torch.cuda.synchronize()
    assert len(deferred) == 3
    assert torch.count_nonzero(out) == 0  # nothing was launched

    compile_deferred(deferred, threads=3)

    compiled_after = []
    previous = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = lambda **kwargs: compiled_after.append(kwargs)
    try:
        for factor in factors:
            _scale(x, out, factor)
            torch.testing.assert_close(out, x * factor)
    finally:
        knobs.runtime.jit_post_compile_hook = previous
    assert compiled_after == []


def test_outside_the_dry_pass_launches_compile_and_run_as_usual() -> None:
    x = torch.ones(300, dtype=torch.float32, device="cuda")
    out = torch.zeros_like(x)
    with defer_compiles():
        pass
    _scale(x, out, 11)
    torch.testing.assert_close(out, x * 11)
