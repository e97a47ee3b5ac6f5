"""Prompt-lookup proposals and the per-request acceptance gate (pure Python, no model)."""

from __future__ import annotations

import pytest

from batchlm.core.ngram_proposer import NgramIndex
from batchlm.core.speculation import AcceptanceGate, SpeculationConfig


def test_longest_ngram_wins_over_a_more_recent_shorter_one() -> None:
    index = NgramIndex(min_n=1, max_n=3)
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 4, 5, 9, 3, 7, 2, 3]
    # "2 3" ends at 2 (followed by 4 5 9); "3" alone last ended at 6 (followed by 7).
    assert index.propose(tokens, 3) == (4, 5, 9)


def test_most_recent_occurrence_and_cap() -> None:
    index = NgramIndex(min_n=1, max_n=2)
    tokens = [8, 1, 2, 30, 31, 1, 2, 40, 41, 42, 1, 2]
    assert index.propose(tokens, 2) == (40, 41)
    assert index.propose(tokens, 5) == (40, 41, 42, 1, 2)
    assert index.propose(tokens, 0) == ()


def test_proposals_stop_at_the_known_tokens_and_follow_appends() -> None:
    index = NgramIndex(min_n=2, max_n=4)
    tokens = [5, 6, 7, 5, 6]
    assert index.propose(tokens, 4) == (7, 5, 6)
    tokens += [7, 1]  # "6 7" then an unseen pair "7 1"
    assert index.propose(tokens, 4) == ()
    tokens += [5, 6, 7]
    assert index.propose(tokens, 2) == (1, 5)


def test_no_match_and_min_n() -> None:
    index = NgramIndex(min_n=2, max_n=3)
    assert index.propose([1], 3) == ()
    assert index.propose([1, 2, 3, 1], 3) == ()  # only a 1-gram repeats
    with pytest.raises(ValueError):
        NgramIndex(min_n=0, max_n=2)
    with pytest.raises(ValueError):
        NgramIndex(min_n=3, max_n=2)


def test_index_matches_a_brute_force_scan() -> None:
    tokens = [(i * i + 3 * i) % 7 for i in range(60)]
    index = NgramIndex(min_n=1, max_n=4)
    for end in range(1, len(tokens) + 1):
        prefix = tokens[:end]
        expected: tuple[int, ...] = ()
        for n in range(min(4, end - 1), 0, -1):
            ends = [p for p in range(n - 1, end - 1) if prefix[p - n + 1 : p + 1] == prefix[end - n :]]
            if ends:
                expected = tuple(prefix[ends[-1] + 1 : ends[-1] + 4])
                break
        assert index.propose(prefix, 3) == expected, end


def test_gate_closes_on_low_acceptance_and_probes_again() -> None:
    config = SpeculationConfig(mode="auto", min_acceptance=0.3, probe_interval=3)
    gate = AcceptanceGate()
    gate.note_verified(4, 4, config)  # 0.75
    assert gate.is_open()
    gate.note_verified(4, 0, config)  # 0.375: still open
    assert gate.is_open()
    gate.note_verified(4, 0, config)  # 0.1875 < 0.3: closed
    assert not gate.is_open()
    for _ in range(3):
        gate.note_plain_decode()
    assert gate.is_open()  # the probe
    gate.note_verified(4, 1, config)  # 0.275, one more poor probe: closed again
    assert not gate.is_open()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="speculative mode"):
        SpeculationConfig(mode="eagle")
    with pytest.raises(ValueError):
        SpeculationConfig(mode="ngram", num_tokens=0)
    assert not SpeculationConfig().enabled


def test_a_fresh_gate_closes_after_two_verifies_that_accept_nothing() -> None:
    config = SpeculationConfig(mode="auto")
    gate = AcceptanceGate()
    gate.note_verified(4, 0, config)
    assert gate.is_open()
    gate.note_verified(4, 0, config)
    assert not gate.is_open()


def test_auto_shortens_drafts_while_acceptance_is_low() -> None:
    from batchlm.core.request_state import RequestState
    from batchlm.core.speculation import Speculator
    from scheduler_harness import make_request

    tokens = list(range(10)) * 3
    for mode, lengths in (("auto", [8, 4]), ("ngram", [8, 8])):
        speculator = Speculator(SpeculationConfig(mode=mode, num_tokens=8))
        state = RequestState(make_request("r", tokens, max_tokens=50))
        assert len(speculator.propose(state, 50)) == lengths[0]
        speculator.note_verified(state, 8, 0)  # rate 0.25
        assert len(speculator.propose(state, 50)) == lengths[1]


def _brute_force(tokens: list[int], min_n: int, max_n: int, max_tokens: int) -> tuple[int, ...]:
    """The longest n-gram ending the sequence, at its latest earlier occurrence, by scanning."""
    end = len(tokens)
    for n in range(min(max_n, end - 1), min_n - 1, -1):
        ends = [p for p in range(n - 1, end - 1) if tokens[p - n + 1 : p + 1] == tokens[end - n :]]
        if ends:
            return tuple(tokens[ends[-1] + 1 : min(ends[-1] + 1 + max_tokens, end)])
    return ()


@pytest.mark.parametrize("vocab", [2, 5, 40])
@pytest.mark.parametrize(("min_n", "max_n"), [(1, 4), (2, 3), (3, 3)])
def test_proposals_follow_appends_like_a_brute_force_scan(vocab: int, min_n: int, max_n: int) -> None:
    import random

    rng = random.Random(vocab * 100 + min_n * 10 + max_n)
    tokens = [rng.randrange(vocab) for _ in range(30)]  # a "prompt", packed at once
    index = NgramIndex(min_n=min_n, max_n=max_n)
    while len(tokens) < 150:
        assert index.propose(tokens, 4) == _brute_force(tokens, min_n, max_n, 4), len(tokens)
        tokens += [rng.randrange(vocab) for _ in range(rng.choice((1, 1, 1, 3)))]


def test_a_match_straddling_two_tokens_bytes_is_not_a_match() -> None:
    """Token ids are searched as packed bytes: the bytes of one id found across two neighbours (at an
    offset that is not a token boundary) must be skipped, and the real occurrence further back found."""
    from array import array

    from batchlm.core.ngram_proposer import TOKEN_BYTES, TOKEN_CODE

    ids = array(TOKEN_CODE, [0x11223344, 0x55667788]).tobytes()
    # The bytes of ids at offset 2, read as one token: it straddles the two.
    straddling = array(TOKEN_CODE, ids[2 : 2 + TOKEN_BYTES])[0]
    tokens = [straddling, 9, 0x11223344, 0x55667788, 7, straddling]
    index = NgramIndex(min_n=1, max_n=2)
    assert index.propose(tokens, 3) == (9, 0x11223344, 0x55667788)
    assert index.propose(tokens, 3) == _brute_force(tokens, 1, 2, 3)


def test_large_token_ids_and_a_sequence_that_restarts() -> None:
    index = NgramIndex(min_n=1, max_n=2)
    big = 2**31 - 1
    assert index.propose([big, 5, 6, big], 2) == (5, 6)
    # A shorter, different sequence (not an extension of the packed one) is packed afresh.
    assert index.propose([3, 4, 3], 2) == (4, 3)
