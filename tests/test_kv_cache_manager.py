"""Tests for per-request block tables: allocation, prefix lookup and sharing, pending blocks, release."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from batchlm.core import kv_cache_manager
from batchlm.core.kv_cache_manager import KVCacheManager
from batchlm.core.request_state import RequestState
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams

BLOCK = 4


def make_state(request_id: str, prompt: list[int]) -> RequestState:
    request = EngineCoreRequest(request_id, tuple(prompt), SamplingParams(max_tokens=8), (), 0.0)
    return RequestState(request)


def run_prompt(kv: KVCacheManager, state: RequestState) -> None:
    """Admit with whatever the cache offers, then compute the whole prompt in one go."""
    cached = kv.find_cached_prefix(state)
    assert kv.admit(state, cached, state.num_tokens - len(cached) * BLOCK)
    state.num_computed_tokens = state.num_tokens
    kv.commit_computed(state)


def test_admit_allocates_blocks_for_the_scheduled_tokens_only() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK)
    state = make_state("a", list(range(10)))
    assert kv.admit(state, [], 5)
    assert len(kv.block_ids("a")) == 2
    state.num_computed_tokens = 5
    assert kv.grow(state, 5)
    assert len(kv.block_ids("a")) == 3
    assert kv.grow(state, 2)  # still inside the third block
    assert len(kv.block_ids("a")) == 3
    assert kv.num_free_blocks == 5


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BLOCK)
    big, small = make_state("big", list(range(16))), make_state("small", [1])
    assert not kv.admit(big, [], 16)
    assert kv.block_ids("big") == [] and kv.num_free_blocks == 3
    assert kv.admit(small, [], 1)
    small.num_computed_tokens = 1
    assert not kv.grow(small, 12)
    assert len(kv.block_ids("small")) == 1 and kv.num_free_blocks == 2


def test_identical_prompt_shares_full_blocks_but_leaves_the_last_token() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    first = make_state("first", prompt)
    run_prompt(kv, first)
    second = make_state("second", prompt)
    cached = kv.find_cached_prefix(second)
    assert cached == kv.block_ids("first")[:2]
    # A prompt that is an exact multiple of the block size cannot reuse its last block.
    aligned = make_state("aligned", prompt[:8])
    assert kv.find_cached_prefix(aligned) == kv.block_ids("first")[:1]


def test_shared_blocks_are_reference_counted() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK)
    prompt = list(range(9))
    first, second = make_state("first", prompt), make_state("second", prompt)
    run_prompt(kv, first)
    run_prompt(kv, second)
    shared = kv.block_ids("first")[:2]
    assert kv.block_ids("second")[:2] == shared
    assert [kv.pool.ref_count(b) for b in shared] == [2, 2]
    kv.free(first)
    assert [kv.pool.ref_count(b) for b in shared] == [1, 1]
    kv.free(second)
    assert kv.num_free_blocks == 16 and kv.usage == 0.0


def test_a_different_earlier_block_breaks_the_hash_chain() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK)
    run_prompt(kv, make_state("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # The second block matches, but behind a different first block it is different content.
    assert kv.find_cached_prefix(make_state("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])) == []
    # A different token after the full blocks still shares both of them.
    assert kv.find_cached_prefix(make_state("c", [1, 2, 3, 4, 5, 6, 7, 8, 0])) == kv.block_ids("a")[:2]


def test_salt_separates_caches_of_different_models() -> None:
    hashes = []
    for salt in ("model-a", "model-b"):
        state = make_state("a", list(range(9)))
        KVCacheManager(num_blocks=8, block_size=BLOCK, salt=salt).find_cached_prefix(state)
        hashes.append(state.block_hashes)
    assert len(hashes[0]) == len(hashes[1]) == 2
    assert not set(hashes[0]) & set(hashes[1])


def test_prefix_caching_disabled_never_hits_and_frees_to_free_list() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    state = make_state("a", list(range(9)))
    run_prompt(kv, state)
    kv.free(state)
    assert kv.find_cached_prefix(make_state("b", list(range(9)))) == []
    assert kv.pool.num_free == 8 and kv.pool.num_evictable == 0


def test_only_computed_full_blocks_are_cached() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK)
    state = make_state("a", list(range(12)))
    assert kv.admit(state, [], 6)
    state.num_computed_tokens = 6  # one full block computed, the second half done
    kv.commit_computed(state)
    probe = make_state("probe", list(range(12)))
    assert kv.find_cached_prefix(probe) == kv.block_ids("a")[:1]


def test_pending_blocks_are_visible_until_computed_or_released() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK)
    prompt = list(range(9))
    runner, waiter = make_state("runner", prompt), make_state("waiter", prompt)
    assert kv.admit(runner, [], 2)
    assert kv.find_cached_prefix(waiter) == []
    assert kv.waits_on_pending_block(waiter, 0)
    runner.num_computed_tokens = 2
    kv.commit_computed(runner)  # half a block: still pending
    assert kv.waits_on_pending_block(waiter, 0)
    assert kv.grow(runner, 2)
    runner.num_computed_tokens = 4
    kv.commit_computed(runner)
    assert len(kv.find_cached_prefix(waiter)) == 1
    assert kv.waits_on_pending_block(waiter, 1)  # block 1 is next, still being computed
    kv.free(runner)
    assert not kv.waits_on_pending_block(waiter, 1)


def test_release_is_tail_first_so_prefix_heads_are_evicted_last() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK)
    state = make_state("s", list(range(9)))  # 2 full blocks + 1 token in a third
    run_prompt(kv, state)
    table = list(kv.block_ids("s"))
    kv.free(state)
    assert list(kv.pool.evictable_blocks()) == [table[1], table[0]]
    assert table[2] in set(kv.pool.free_blocks())


def test_cached_prefix_survives_until_its_blocks_are_needed() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK)
    old = make_state("old", list(range(9)))
    run_prompt(kv, old)
    kv.free(old)  # 2 evictable cached blocks + 2 free (one was the partial block)
    filler = make_state("filler", [50, 51, 52])
    run_prompt(kv, filler)  # takes a free block, so the cache is untouched
    assert len(kv.find_cached_prefix(make_state("again", list(range(9))))) == 2
    other = make_state("other", [60] * 12)
    assert kv.admit(other, [], 12)  # 3 blocks: 1 free + 2 evicted
    assert kv.find_cached_prefix(make_state("again2", list(range(9)))) == []


def test_admit_counts_revived_evictable_blocks_against_availability() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BLOCK)
    old = make_state("old", list(range(9)))
    run_prompt(kv, old)
    kv.free(old)  # 2 cached evictable + 1 free
    again = make_state("again", list(range(8)) + [99] * 8)
    cached = kv.find_cached_prefix(again)
    assert len(cached) == 2
    # Needs 2 more blocks beyond the 2 shared ones; only 1 is left once the shared ones are revived.
    assert not kv.admit(again, cached, 8)
    assert kv.pool.num_evictable == 2 and kv.block_ids("again") == []
    assert kv.admit(again, cached, 4)


def test_each_full_block_is_hashed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real_hash_block = kv_cache_manager.hash_block

    def counting_hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
        calls.append(tuple(token_ids))
        return real_hash_block(parent, token_ids)

    monkeypatch.setattr(kv_cache_manager, "hash_block", counting_hash_block)
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK)
    state = make_state("a", list(range(13)))  # 3 full blocks + 1 token
    kv.find_cached_prefix(state)
    kv.find_cached_prefix(state)
    run_prompt(kv, state)
    state.append_token(77)  # the 14th token: no new full block yet
    kv.find_cached_prefix(state)
    assert calls == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]
