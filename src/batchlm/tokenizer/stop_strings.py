"""Stop-string matching over streamed text, holding back any tail that may still become a stop string."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Filters a text stream: `feed` returns the part that is safe to show.

    Generation stops at the stop string that is *completed* first (the earliest match end; on a tie,
    the longest one), which is where character-by-character generation would have stopped whatever the
    token boundaries. Its text is dropped unless `include_stop_str_in_output`; nothing after it is ever
    returned. Without inclusion, a tail that is a proper prefix of some stop string is held back until
    later text decides it. Work per call is O(new text + longest stop string).
    """

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            raise TypeError("stop must be a sequence of strings, not a single string")
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(dict.fromkeys(stop))
        self._include = include_stop_str_in_output
        self._lookback = max((len(s) for s in self._stops), default=1) - 1
        # Text received but not yet returned (a possible stop-string start).
        self._held = ""
        # Returned text that a later stop string could still start in (inclusion mode only).
        self._tail = ""
        # The stop string that ended the stream, once one did.
        self.stop_reason: str | None = None
        # Characters fed so far, and how many of the first of them no stop string may end in.
        self._fed = 0
        self._no_stop_before = 0

    def feed(self, text: str, final: bool = False, can_stop: bool = True) -> str:
        """Take new text; return what may be shown now. `final` releases any held-back tail.
        can_stop=False: no stop string may end in this text (it still may start in it)."""
        if self.stop_reason is not None:
            return ""
        if not self._stops:
            return text
        window = self._tail + self._held + text
        released_before = len(self._tail)  # window[:released_before] was already returned
        window_start = self._fed - len(self._tail) - len(self._held)
        self._fed += len(text)
        if not can_stop:
            self._no_stop_before = self._fed
        match = self._first_completed(window, self._no_stop_before - window_start)
        if match is not None:
            start, stop = match
            self.stop_reason = stop
            self._held = self._tail = ""
            cut = start + len(stop) if self._include else start
            return window[released_before:cut]
        keep = 0 if (final or self._include) else self._undecided_suffix_len(window)
        cut = len(window) - keep
        self._held = window[cut:]
        if self._include:
            self._tail = window[max(0, len(window) - self._lookback) :]
        return window[released_before:cut]

    def _first_completed(self, window: str, min_end: int) -> tuple[int, str] | None:
        """(start, stop) of the match that ends first in `window`, past its first min_end characters;
        ties go to the longest stop."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self._stops:
            start = window.find(stop, max(0, min_end - len(stop) + 1))
            if start < 0:
                continue
            candidate = (start + len(stop), -len(stop), stop)
            if best is None or candidate < best:
                best = candidate
        if best is None:
            return None
        end, _, stop = best
        return end - len(stop), stop

    def _undecided_suffix_len(self, window: str) -> int:
        """Length of the longest suffix of `window` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(window)), longest, -1):
                if window.endswith(stop[:length]):
                    longest = length
                    break
        return longest
