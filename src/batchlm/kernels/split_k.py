"""Split-K for the one-row decode kernels (kernels/fp8_gemv.py, kernels/w4a16_gemv.py): programs that
share an output tile each sum a slice of K, and the sums meet in the same launch.

Each split stores its fp32 sums in a scratch row and counts itself in at the tile's arrival counter;
the last to arrive adds every row, writes the output and puts the counter back at zero. So there is
neither a second launch nor a memset per call (at decode sizes either costs about as much as the
product), and a CUDA graph replays the launch as it is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Most programs one launch splits K across (the last split reads this many scratch rows).
MAX_SPLIT_K = 32


@triton.jit
def store_output(total, bias_ptr, out_ptr, cols, col_ok, HAS_BIAS: tl.constexpr):
    """out[cols] = total (+ bias), in the output's dtype."""
    if HAS_BIAS:
        total += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def finish_split(
    total, tile, split, cols, col_ok, N, partial_ptr, arrivals_ptr, bias_ptr, out_ptr,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """Write this program's fp32 sums `total` [BLOCK_N] (of split `split` of output tile `tile`):
    directly without split-K, else through the scratch (partial_ptr [SPLIT_K, N] float32,
    arrivals_ptr one int32 per tile, zero between launches)."""
    if SPLIT_K == 1:
        store_output(total, bias_ptr, out_ptr, cols, col_ok, HAS_BIAS)
    else:
        tl.store(partial_ptr + split * N + cols, total, mask=col_ok)
        tl.debug_barrier()  # every thread's store precedes the release below
        arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(total)
            for other in tl.static_range(SPLIT_K):
                total += tl.load(partial_ptr + other * N + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
            store_output(total, bias_ptr, out_ptr, cols, col_ok, HAS_BIAS)
            tl.atomic_xchg(arrivals_ptr + tile, 0)


class SplitScratch:
    """Per device: the fp32 partial sums and per-tile arrival counters every split launch shares
    (launches on one stream run one after another). Counters are back at zero after each launch, so
    they are zeroed once and CUDA graph replays reuse them; a buffer outgrown is kept alive, as a
    captured graph may still point at it."""

    def __init__(self) -> None:
        self.buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.outgrown: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, device: torch.device, partials: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        have = self.buffers.get(device)
        if have is not None and have[0].numel() >= partials and have[1].numel() >= tiles:
            return have
        if have is not None:
            self.outgrown.append(have)
            partials, tiles = max(partials, have[0].numel()), max(tiles, have[1].numel())
        fresh = (
            torch.empty(partials, dtype=torch.float32, device=device),
            torch.zeros(tiles, dtype=torch.int32, device=device),
        )
        self.buffers[device] = fresh
        return fresh


SCRATCH = SplitScratch()


def split_buffers(
    out: torch.Tensor, split_k: int, out_features: int, tiles: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials, arrivals) for a launch: the shared scratch with split-K, else placeholders (unread)."""
    if not 1 <= split_k <= MAX_SPLIT_K:
        raise ValueError(f"split_k must be 1..{MAX_SPLIT_K}, not {split_k}")
    if split_k == 1:
        return out, out
    return SCRATCH.get(out.device, split_k * out_features, tiles)
