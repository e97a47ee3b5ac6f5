"""CPU KV-cache sizing: by default no more than the running requests can fill (max_num_seqs requests of
max_model_len tokens, rounded up to whole blocks) and never above the 2 GiB cap; --cpu-kv-cache-gib wins.
Its allocation: zeros the process holds only once written, so its size is checked against the memory
available at start."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from batchlm.config import EngineConfig
from batchlm.models.loader import ModelShape
from batchlm.runner import kv_cache
from batchlm.runner.kv_cache import (
    DEFAULT_CPU_KV_CACHE_GIB,
    GIB,
    allocate_kv_caches,
    bytes_per_block,
    fit_host_memory,
    num_blocks_for,
)

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


@pytest.fixture(autouse=True)
def plenty_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizing tests do not depend on this machine's free memory (the tests of that set their own)."""
    monkeypatch.setattr(kv_cache, "available_host_bytes", lambda: None)


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


def test_an_explicit_size_below_one_block_is_refused_naming_the_block_size() -> None:
    # 1e-6 GiB is about 1 KiB, under one 64 KiB block: the size asked for is too small, not the memory.
    with pytest.raises(ValueError, match=r"--cpu-kv-cache-gib 1e-06 holds no KV-cache block: .* 65536 bytes"):
        blocks(EngineConfig(cpu_kv_cache_gib=1e-6), 64)


def test_the_default_takes_at_most_half_of_the_memory_available(monkeypatch: pytest.MonkeyPatch) -> None:
    per_block = bytes_per_block(SHAPE, 16, torch.float32)  # 64 KiB
    monkeypatch.setattr(kv_cache, "available_host_bytes", lambda: 100 * per_block)
    assert blocks(EngineConfig(max_num_seqs=32, block_size=16), 2048) == 50
    # Under half of it: unchanged.
    assert blocks(EngineConfig(max_num_seqs=1, block_size=16), 640) == 40


def test_an_explicit_size_beyond_the_memory_available_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_cache, "available_host_bytes", lambda: GIB)
    assert blocks(EngineConfig(cpu_kv_cache_gib=0.75), 2048) == int(0.75 * GIB) // (64 * 1024)
    with pytest.raises(ValueError, match=r"--cpu-kv-cache-gib 1\.5 is more than the 1\.0 GiB"):
        blocks(EngineConfig(cpu_kv_cache_gib=1.5), 2048)


def test_tensor_parallel_ranks_share_the_memory_available() -> None:
    two_ranks = EngineConfig(tensor_parallel_size=2)
    assert fit_host_memory(two_ranks, 1000, 1 << 20, 4000 << 20) == 1000  # 1000 MiB of each rank's 2000
    assert fit_host_memory(two_ranks, 1500, 1 << 20, 4000 << 20) == 1000
    with pytest.raises(ValueError, match="for each of 2 ranks"):
        fit_host_memory(EngineConfig(tensor_parallel_size=2, cpu_kv_cache_gib=3.0), 3072, 1 << 20, 4 * GIB)


def test_unknown_available_memory_leaves_the_size_as_it_is() -> None:
    assert fit_host_memory(EngineConfig(), 10_000, 1 << 20, None) == 10_000
    assert fit_host_memory(EngineConfig(cpu_kv_cache_gib=64.0), 10_000, 1 << 20, None) == 10_000


def test_the_cpu_caches_are_zeros_one_tensor_per_layer() -> None:
    caches = allocate_kv_caches(SHAPE, 8, 16, torch.bfloat16, CPU)
    assert len(caches) == SHAPE.num_layers
    for cache in caches:
        assert cache.shape == (2, 8, 16, SHAPE.num_kv_heads, SHAPE.head_dim)
        assert cache.dtype == torch.bfloat16 and cache.is_contiguous()
        assert not cache.any()
    caches[0][1, 3].fill_(2.0)  # each layer has storage of its own
    assert caches[0].sum().item() == 2.0 * 16 * SHAPE.num_kv_heads * SHAPE.head_dim
    assert not caches[1].any()
    assert allocate_kv_caches(SHAPE, 0, 16, torch.float32, CPU)[0].numel() == 0


def _resident_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_cpu_cache_is_resident_only_where_written() -> None:
    before = _resident_kib()
    wide = ModelShape(
        num_layers=1,
        num_heads=8,
        num_kv_heads=8,
        head_dim=128,
        hidden_size=1024,
        vocab_size=1000,
        max_model_len=2048,
    )
    (cache,) = allocate_kv_caches(wide, 4096, 16, torch.float32, CPU)  # 2 x 4096 x 64 KiB: 512 MiB of zeros
    assert _resident_kib() - before < 64 * 1024
    cache[0, :1024].fill_(1.0)  # 64 MiB written
    assert _resident_kib() - before >= 48 * 1024
    assert cache[0, :1024].all() and not cache[1].any()


def test_start_up_warns_when_the_cache_holds_less_than_the_context(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from batchlm.models.random_model import write_random_model
    from batchlm.runner.model_runner import ModelRunner

    model_dir = write_random_model(tmp_path / "m", overrides={"max_position_embeddings": 512})
    for gib, warned in ((0.0001, True), (None, False)):  # ~200 tokens of its cache; the default
        caplog.clear()
        runner = ModelRunner(EngineConfig(model=str(model_dir), cpu_kv_cache_gib=gib), model_dir)
        with caplog.at_level("WARNING", logger="batchlm.runner.kv_cache"):
            facts = runner.initialize_kv_cache()
        held = facts.num_blocks * facts.block_size
        assert (held < 512) == warned
        assert any("fewer than the context of 512" in r.getMessage() for r in caplog.records) == warned


def test_a_block_too_large_for_the_cache_names_the_block_size_too() -> None:
    # --block-size 1000000 alone: the message said only to raise the cache size the user never set.
    with pytest.raises(
        ValueError, match=r"holds no KV-cache block: one block of 1000000 tokens .* lower --block-size"
    ):
        blocks(EngineConfig(block_size=1_000_000), 64)
