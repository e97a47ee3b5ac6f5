"""Shape and dtype checks and the decode split count, shared by the paged-attention kernel launchers (plain
torch, no triton)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

LOG2_E = 1.4426950408889634  # kernels score in the log2 domain: exp(x) = exp2(x * LOG2_E)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MIN_HEAD_DIM = 16  # tl.dot's smallest inner dimension
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class PagedShape:
    """The static geometry a paged-attention launch is specialised on."""

    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per KV-cache block

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (1 = MHA, num_heads = MQA)."""
        return self.num_heads // self.num_kv_heads


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def check_kv_cache(kv_cache: torch.Tensor) -> None:
    """Raise ValueError unless kv_cache is [2, num_blocks, block_size, num_kv_heads, head_dim]."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache must be contiguous in head_dim (stride 1 on the last axis)")
    head_dim = kv_cache.shape[-1]
    # Any width in range: the kernels pad one that is not a power of two (80, 96) to the next.
    if head_dim > MAX_HEAD_DIM or head_dim < MIN_HEAD_DIM:
        raise ValueError(f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")


def check_paged_inputs(
    query: torch.Tensor, kv_cache: torch.Tensor, sinks: torch.Tensor | None = None
) -> PagedShape:
    """Validate query [T, num_heads, head_dim] against the cache (and the sink logits, one a query
    head, where given) and return the launch geometry."""
    check_kv_cache(kv_cache)
    if query.dim() != 3:
        raise ValueError(f"query must be [tokens, num_heads, head_dim], got shape {tuple(query.shape)}")
    _, block_size, num_kv_heads, head_dim = kv_cache.shape[1:]
    num_heads = query.shape[1]
    if query.shape[2] != head_dim:
        raise ValueError(f"query head_dim {query.shape[2]} does not match the KV cache's {head_dim}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {query.dtype}; supported: {SUPPORTED_DTYPES}")
    if kv_cache.dtype != query.dtype and kv_cache.dtype != torch.float8_e4m3fn:
        raise ValueError(f"query dtype {query.dtype} differs from KV-cache dtype {kv_cache.dtype}")
    if query.stride(-1) != 1:
        raise ValueError("query must be contiguous in head_dim (stride 1 on the last axis)")
    if sinks is not None and (
        sinks.shape != (num_heads,) or sinks.stride(0) != 1 or sinks.device != query.device
    ):
        raise ValueError(
            f"sinks must be [{num_heads}] and contiguous on {query.device}, got {tuple(sinks.shape)}"
        )
    return PagedShape(num_heads, num_kv_heads, head_dim, block_size)


def dot_precision(dtype: torch.dtype) -> str:
    """Triton dot precision: exact fp32 products for fp32 inputs (tf32 would cost ~3 digits)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (grid-size heuristics)."""
    if device.type != "cuda":
        return 8  # Triton's CPU interpreter (tests without a GPU): any small number will do
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


# Upper bound on splits per request (bounds the workspace and the reduce's work).
MAX_SPLITS = 256
# A split shorter than this spends more on its own overhead than it saves in parallelism: half a
# tile. At one request a program's wait on memory is the step's latency, so more, shorter splits win
# until one program a multiprocessor (BENCHMARKS.md, "Single stream: splits of half a tile").
MIN_TOKENS_PER_SPLIT = 32


def choose_num_splits(
    batch_size: int, num_kv_heads: int, max_context: int, sm_count: int, programs_per_sm: int = 4
) -> int:
    """Splits per request from static quantities only (so CUDA-graph replays keep the same grid).

    Rounded down to a power of two: the split count is a compile-time constant of the kernels, and
    eager steps (decodes beside prefill chunks) come in every batch size and context length, so
    exact counts would compile a new kernel pair for many of them while serving. Powers of two are
    the few variants the start-up graph captures have already compiled."""
    programs = batch_size * num_kv_heads
    wanted = -(-sm_count * programs_per_sm // max(programs, 1))
    useful = -(-max_context // MIN_TOKENS_PER_SPLIT)
    splits = max(1, min(wanted, useful, MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)


def newest_rows(newest: int | None, block_n: int) -> int:
    """The kernel's NEWEST: 0 (any row of a split's first tile may have changed) where the count is
    unknown or a tile's worth or more, so that a launch compiles one of few variants."""
    if newest is None or newest >= block_n:
        return 0
    if newest < 1:
        raise ValueError(f"a step writes at least one token of each decode row, got newest={newest}")
    return newest
