"""Tests for StopStringMatcher: first-completed stop string, hold-back, inclusion."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchlm.tokenizer.stop_strings import StopStringMatcher


def expected_output(text: str, stops: list[str], include: bool, quiet: int = 0) -> tuple[str, str | None]:
    """Reference: scan the whole text for the stop string that is completed first, past its first
    `quiet` characters (text no stop string may end in)."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        start = text.find(stop, max(0, quiet - len(stop) + 1))
        if start >= 0:
            candidate = (start + len(stop), -len(stop), stop)
            best = candidate if best is None or candidate < best else best
    if best is None:
        return text, None
    end, _, stop = best
    return text[: end if include else end - len(stop)], stop


def feed_in_pieces(matcher: StopStringMatcher, text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    released = [matcher.feed(text[a:b]) for a, b in itertools.pairwise(bounds)]
    return [*released, matcher.feed("", final=True)]


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abc.", max_size=30),
    stops=st.lists(st.text(alphabet="abc.", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
    include=st.booleans(),
)
def test_matches_the_whole_text_reference(
    text: str, stops: list[str], cuts: list[int], include: bool
) -> None:
    matcher = StopStringMatcher(stops, include)
    released = feed_in_pieces(matcher, text, cuts)
    assert ("".join(released), matcher.stop_reason) == expected_output(text, stops, include)


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abc.", max_size=30),
    stops=st.lists(st.text(alphabet="abc.", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
    quiet=st.integers(0, 40),
    include=st.booleans(),
)
def test_no_stop_ends_in_text_fed_as_unable_to_stop(
    text: str, stops: list[str], cuts: list[int], quiet: int, include: bool
) -> None:
    quiet = min(quiet, len(text))
    matcher = StopStringMatcher(stops, include)
    bounds = sorted({0, quiet, len(text), *(c % (len(text) + 1) for c in cuts)})
    released = [matcher.feed(text[a:b], can_stop=b > quiet) for a, b in itertools.pairwise(bounds)]
    released.append(matcher.feed("", final=True))
    assert ("".join(released), matcher.stop_reason) == expected_output(text, stops, include, quiet)


def test_a_stop_may_start_in_text_that_could_not_stop() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("a STOP ST", can_stop=False) == "a STOP "
    assert matcher.feed("OP b") == ""
    assert matcher.stop_reason == "STOP"


def test_holds_back_a_possible_stop_until_decided() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("hello ST") == "hello "
    assert matcher.feed("A") == "STA"  # "STA" cannot start "STOP": released
    assert matcher.feed("y ST") == "y "
    assert matcher.feed("OP and more") == ""
    assert matcher.stop_reason == "STOP"
    assert matcher.feed("ignored", final=True) == ""


def test_first_completed_stop_wins_over_earlier_start() -> None:
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("xabcd") == "xa"
    assert matcher.stop_reason == "bc"


def test_inclusion_releases_without_holding_back() -> None:
    matcher = StopStringMatcher(["</s>"], include_stop_str_in_output=True)
    assert matcher.feed("text </") == "text </"
    assert matcher.feed("s> tail") == "s>"
    assert matcher.stop_reason == "</s>"


def test_no_stops_passes_text_through() -> None:
    matcher = StopStringMatcher()
    assert matcher.feed("abc") == "abc"
    assert matcher.stop_reason is None


@pytest.mark.parametrize(("stop", "error"), [("abc", TypeError), ([""], ValueError)])
def test_bad_stop_arguments(stop: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        StopStringMatcher(stop)  # type: ignore[arg-type]


def undecided_suffix(text: str, stops: list[str]) -> int:
    """Reference: the longest suffix of `text` that is a proper prefix of some stop string."""
    lengths = [n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])]
    return max(lengths, default=0)


def reference_releases(
    stops: list[str], include: bool, calls: list[tuple[str, bool]]
) -> tuple[list[str], str | None]:
    """Reference, call by call: what the whole text fed so far allows to be shown, less what earlier
    calls showed; and the stop string matched. The last call is final."""
    fed, quiet, shown, releases = "", 0, 0, []
    stop: str | None = None
    for number, (text, can_stop) in enumerate(calls):
        fed += text
        if not can_stop:
            quiet = len(fed)
        visible, stop = expected_output(fed, stops, include, quiet)
        if stop is None and not include and number < len(calls) - 1:
            visible = fed[: len(fed) - undecided_suffix(fed, stops)]
        releases.append(visible[shown:])
        shown = len(visible)
        if stop is not None:
            releases.extend("" for _ in calls[number + 1 :])
            break
    return releases, stop


@pytest.mark.parametrize("alphabet", ["ab", "abc.", "aé€😀\n"])
def test_random_streams_match_the_brute_force_reference(alphabet: str) -> None:
    """Overlapping stop sets, stops split across many deltas, unicode, text that may not stop."""
    rng = random.Random(f"stops-{alphabet}")

    def word(low: int, high: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))

    for _ in range(3000):
        stops = [word(1, 7) for _ in range(rng.randint(1, 4))]
        include = rng.random() < 0.3
        calls = [(word(0, rng.choice([1, 3, 9])), rng.random() < 0.8) for _ in range(rng.randint(1, 14))]
        calls.append(("", True))
        matcher = StopStringMatcher(stops, include)
        released = [matcher.feed(text, can_stop=can_stop) for text, can_stop in calls[:-1]]
        released.append(matcher.feed("", final=True))
        assert (released, matcher.stop_reason) == reference_releases(stops, include, calls), (stops, calls)


@pytest.mark.parametrize(
    ("stops", "pattern"),
    [
        (["a" * 2000 + "b"], "a" * 3000 + "c"),  # follows a long stop, then diverges
        (["ab" * 1000 + "x", "a" * 1500 + "y"], "ab" * 1200 + "a" * 1600 + "z"),  # two long partial matches
        (["aab" * 500 + "q"], "aab" * 400 + "aaab" * 300),  # diverges and restarts repeatedly
    ],
)
@pytest.mark.parametrize("include", [False, True])
def test_work_is_linear_in_the_text(stops: list[str], pattern: str, include: bool) -> None:
    """Steps are counted, not timed: each character costs O(1) per stop string, amortized, even
    one character at a time while a long prefix of a stop string is held back."""
    matcher = StopStringMatcher(stops, include)
    text = pattern * 20
    released = [matcher.feed(char) for char in text]
    released.append(matcher.feed("", final=True))
    assert "".join(released) == text and matcher.stop_reason is None
    assert matcher.work <= 4 * len(text) * len(stops)
