"""Tests for the KV block pool: free list, reference counts, cached blocks and LRU eviction."""

from __future__ import annotations

import pytest

from batchlm.core.block_pool import BlockPool, hash_block, root_block_hash

ROOT = root_block_hash("")


def test_allocate_takes_distinct_free_blocks_with_one_reference() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3
    assert all(pool.ref_count(b) == 1 for b in blocks)
    assert (pool.num_free, pool.num_used, pool.num_available) == (1, 3, 1)


def test_allocating_more_than_available_raises_and_changes_nothing() -> None:
    pool = BlockPool(2)
    pool.allocate(1)
    with pytest.raises(RuntimeError, match="asked for 2 KV blocks but only 1"):
        pool.allocate(2)
    assert pool.num_available == 1


def test_release_of_uncached_block_returns_it_to_free_list() -> None:
    pool = BlockPool(2)
    [block] = pool.allocate(1)
    pool.release([block])
    assert pool.ref_count(block) == 0
    assert block in set(pool.free_blocks())
    assert pool.num_evictable == 0


def test_double_free_is_an_error() -> None:
    pool = BlockPool(2)
    [block] = pool.allocate(1)
    pool.release([block])
    with pytest.raises(RuntimeError, match=f"double free of KV block {block}"):
        pool.release([block])


def test_cached_block_becomes_evictable_and_keeps_its_hash() -> None:
    pool = BlockPool(2)
    [block] = pool.allocate(1)
    block_hash = hash_block(ROOT, [1, 2])
    assert pool.cache(block, block_hash)
    pool.release([block])
    assert list(pool.evictable_blocks()) == [block]
    assert pool.lookup(block_hash) == block
    assert pool.num_available == 2 and pool.num_free == 1


def test_share_revives_an_evictable_block() -> None:
    pool = BlockPool(2)
    [block] = pool.allocate(1)
    pool.cache(block, hash_block(ROOT, [5]))
    pool.release([block])
    pool.share([block])
    assert pool.ref_count(block) == 1
    assert pool.num_evictable == 0 and pool.num_available == 1
    pool.share([block])
    assert pool.ref_count(block) == 2


def test_eviction_only_when_free_list_is_empty_and_least_recent_first() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    hashes = [hash_block(ROOT, [i]) for i in range(3)]
    for block, block_hash in zip(blocks, hashes, strict=True):
        pool.cache(block, block_hash)
    pool.release([blocks[1], blocks[0], blocks[2]])  # release order = recency order
    [fresh] = pool.allocate(1)
    assert fresh not in blocks  # the free block is used before any cached one
    assert pool.num_evictable == 3
    evicted = pool.allocate(2)
    assert evicted == [blocks[1], blocks[0]]
    assert pool.lookup(hashes[1]) is None and pool.lookup(hashes[0]) is None
    assert pool.lookup(hashes[2]) == blocks[2]
    assert pool.block_hash(blocks[1]) is None


def test_cache_refuses_a_second_block_with_the_same_content() -> None:
    pool = BlockPool(2)
    first, second = pool.allocate(2)
    block_hash = hash_block(ROOT, [9, 9])
    assert pool.cache(first, block_hash)
    assert not pool.cache(second, block_hash)
    assert pool.lookup(block_hash) == first
    pool.release([second])
    assert second in set(pool.free_blocks())  # the duplicate is plain free space


def test_block_hash_chains_parent_and_tokens() -> None:
    first = hash_block(ROOT, [1, 2, 3])
    assert hash_block(ROOT, [1, 2, 3]) == first
    assert hash_block(ROOT, [1, 2, 4]) != first
    assert hash_block(first, [4, 5, 6]) != hash_block(ROOT, [4, 5, 6])


def test_salt_changes_the_root_hash() -> None:
    assert root_block_hash("model-a") != root_block_hash("model-b")
    assert root_block_hash("model-a") == root_block_hash("model-a")


def test_pool_needs_at_least_one_block() -> None:
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockPool(0)
