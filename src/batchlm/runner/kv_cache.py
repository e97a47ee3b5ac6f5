"""Size and allocate the paged KV cache from a memory budget."""

from __future__ import annotations

import logging

import torch

from batchlm.config import EngineConfig
from batchlm.models.loader import ModelShape

logger = logging.getLogger(__name__)

GIB = 1 << 30


def bytes_per_block(shape: ModelShape, block_size: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for one block of tokens."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * shape.num_layers * block_size * shape.num_kv_heads * shape.head_dim * element


def kv_budget_bytes(config: EngineConfig, device: torch.device) -> int:
    """CPU: a fixed number of GiB. GPU: the utilisation fraction of total memory, less what this process
    already holds at its peak (weights + activations of the profile run) and what other processes hold."""
    if device.type != "cuda":
        return int(config.cpu_kv_cache_gib * GIB)
    free, total = torch.cuda.mem_get_info(device)
    ours_now = torch.cuda.memory_reserved(device)
    used_by_others = total - free - ours_now
    peak = torch.cuda.max_memory_reserved(device)
    budget = int(total * config.gpu_memory_utilization) - peak - max(used_by_others, 0)
    logger.info(
        "GPU memory: total %.1f GiB, peak in use %.2f GiB, others %.2f GiB -> KV cache budget %.2f GiB",
        total / GIB,
        peak / GIB,
        used_by_others / GIB,
        budget / GIB,
    )
    return budget


def num_blocks_for(config: EngineConfig, shape: ModelShape, dtype: torch.dtype, device: torch.device) -> int:
    if config.num_gpu_blocks_override is not None:
        return config.num_gpu_blocks_override
    per_block = bytes_per_block(shape, config.block_size, dtype)
    num_blocks = kv_budget_bytes(config, device) // per_block
    if num_blocks < 1:
        raise ValueError(
            "no memory is left for the KV cache after loading the model: raise --gpu-memory-utilization "
            "(GPU) or --cpu-kv-cache-gib (CPU), or lower --max-num-batched-tokens"
        )
    return int(num_blocks)


def allocate_kv_caches(
    shape: ModelShape, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer, zeroed so that padding
    slots never hold NaNs that a masked matmul could spread."""
    return [
        torch.zeros((2, num_blocks, block_size, shape.num_kv_heads, shape.head_dim), dtype=dtype, device=device)
        for _ in range(shape.num_layers)
    ]
