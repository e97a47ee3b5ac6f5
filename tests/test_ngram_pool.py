"""The cross-request n-gram pool: proposals from finished requests' tokens, the shortest n-gram it
trusts, which occurrence wins, and eviction by capacity."""

from __future__ import annotations

import pytest

from batchlm.core.ngram_pool import POOL_MIN_NGRAM, NgramPool


def test_proposes_what_followed_in_a_finished_sequence() -> None:
    pool = NgramPool(max_n=4, capacity_tokens=1000)
    pool.add([5, 6, 7, 8, 9, 10, 11, 12])
    assert pool.propose([1, 2, 7, 8, 9], 3) == (10, 11, 12)
    assert pool.propose([1, 2, 7, 8, 9], 10) == (10, 11, 12), "no more than the sequence holds"
    assert pool.propose([1, 2, 7, 8, 9], 0) == ()
    assert pool.propose([1, 2, 3, 4], 3) == ()


def test_matches_shorter_than_the_minimum_are_not_used() -> None:
    pool = NgramPool(max_n=4, capacity_tokens=1000)
    pool.add([5, 6, 7, 8, 9, 10])
    assert POOL_MIN_NGRAM == 3
    assert pool.propose([1, 7, 8, 9], 2) == (10,)
    assert pool.propose([1, 2, 8, 9], 2) == (), "a 1- or 2-token match recurs by chance"


def test_longest_match_first_and_latest_occurrence() -> None:
    pool = NgramPool(max_n=4, capacity_tokens=1000)
    pool.add([1, 2, 3, 4, 50, 51])
    pool.add([9, 2, 3, 4, 60, 61])
    assert pool.propose([1, 2, 3, 4], 2) == (50, 51), "the 4-gram beats the newer 3-gram"
    assert pool.propose([7, 2, 3, 4], 2) == (60, 61), "the latest occurrence of the 3-gram"


def test_the_oldest_sequences_leave_when_the_capacity_is_passed() -> None:
    pool = NgramPool(max_n=4, capacity_tokens=12)
    pool.add([1, 2, 3, 4, 5, 6])
    pool.add([11, 12, 13, 14, 15, 16])
    assert pool.propose([2, 3, 4], 1) == (5,)
    pool.add([21, 22, 23, 24, 25])
    assert len(pool) == 2 and pool.num_tokens == 11
    assert pool.propose([2, 3, 4], 1) == (), "the first sequence was evicted with its n-grams"
    assert pool.propose([12, 13, 14], 1) == (15,)


def test_a_sequence_longer_than_the_capacity_keeps_its_end() -> None:
    pool = NgramPool(max_n=4, capacity_tokens=5)
    pool.add(list(range(100, 120)))
    assert pool.num_tokens == 5
    assert pool.propose([115, 116, 117], 2) == (118, 119)
    assert pool.propose([100, 101, 102], 2) == ()
    with pytest.raises(ValueError, match="capacity"):
        NgramPool(max_n=4, capacity_tokens=0)


def test_no_match_spans_two_sequences() -> None:
    pool = NgramPool(max_n=4, capacity_tokens=1000)
    pool.add([1, 2, 3, 9])
    pool.add([4, 5, 6, 7])
    assert pool.propose([8, 3, 9, 4], 2) == (), "3 9 | 4 5: the sequences only sit side by side"
    assert pool.propose([8, 2, 3, 9], 2) == (), "nothing follows the first sequence's end"


def _reference(sequences: list[list[int]], tokens: list[int], max_n: int, max_tokens: int) -> tuple[int, ...]:
    """The pool's rule by brute force: longest n-gram first, its latest occurrence (the newest sequence,
    then the last position), and a shorter n-gram when nothing follows that occurrence."""
    for n in range(min(max_n, len(tokens)), POOL_MIN_NGRAM - 1, -1):
        gram = tokens[len(tokens) - n :]
        hits = [
            (serial, end)
            for serial, seq in enumerate(sequences)
            for end in range(n - 1, len(seq))
            if seq[end - n + 1 : end + 1] == gram
        ]
        if hits:
            serial, end = max(hits)
            following = tuple(sequences[serial][end + 1 : end + 1 + max_tokens])
            if following:
                return following
    return ()


@pytest.mark.parametrize("vocab", [2, 3, 6])
def test_proposals_match_a_brute_force_scan_through_evictions(vocab: int) -> None:
    import random

    rng = random.Random(vocab)
    pool = NgramPool(max_n=5, capacity_tokens=60)
    kept: list[list[int]] = []
    for _ in range(25):
        sequence = [rng.randrange(vocab) for _ in range(rng.randrange(2, 30))]
        pool.add(sequence)
        if len(sequence) > POOL_MIN_NGRAM:
            kept.append(sequence)
        while sum(map(len, kept)) > 60:
            kept.pop(0)
        assert len(pool) == len(kept) and pool.num_tokens == sum(map(len, kept))
        for _ in range(10):
            query = [rng.randrange(vocab) for _ in range(rng.randrange(1, 8))]
            assert pool.propose(query, 4) == _reference(kept, query, 5, 4), (kept, query)
