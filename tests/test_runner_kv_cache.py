"""CPU KV-cache sizing: by default no more than the running requests can fill (max_num_seqs requests of
max_model_len tokens, rounded up to whole blocks) and never above the 2 GiB cap; --cpu-kv-cache-gib wins."""

from __future__ import annotations

import torch

from batchlm.config import EngineConfig
from batchlm.models.loader import ModelShape
from batchlm.runner.kv_cache import DEFAULT_CPU_KV_CACHE_GIB, GIB, bytes_per_block, num_blocks_for

CPU = torch.device("cpu")
# 4 layers x 2 KV heads x 64 dims, float32: 2 * 4 * 16 * 2 * 64 * 4 = 64 KiB per 16-token block.
SHAPE = ModelShape(
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    hidden_size=512,
    vocab_size=1000,
    max_model_len=2048,
)


def blocks(config: EngineConfig, max_model_len: int, shape: ModelShape = SHAPE) -> int:
    return num_blocks_for(config, shape, torch.float32, CPU, max_model_len)


def test_the_default_holds_what_the_running_requests_can_fill() -> None:
    assert blocks(EngineConfig(max_num_seqs=32, block_size=16), 2048) == 32 * 128
    # A length that is not a multiple of the block size rounds up per request.
    assert blocks(EngineConfig(max_num_seqs=3, block_size=16), 1000) == 3 * 63


def test_the_default_never_exceeds_the_cap() -> None:
    wide = ModelShape(
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        hidden_size=4096,
        vocab_size=1000,
        max_model_len=131072,
    )
    per_block = bytes_per_block(wide, 16, torch.float32)
    capped = blocks(EngineConfig(max_num_seqs=32, block_size=16), 131072, wide)
    assert capped == int(DEFAULT_CPU_KV_CACHE_GIB * GIB) // per_block
    assert capped < 32 * 131072 // 16


def test_an_explicit_size_wins_even_when_larger_than_needed() -> None:
    per_block = bytes_per_block(SHAPE, 16, torch.float32)
    assert blocks(EngineConfig(max_num_seqs=1, cpu_kv_cache_gib=0.5), 64) == GIB // 2 // per_block
