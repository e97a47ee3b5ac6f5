"""Stop-string matching over streamed text, holding back any tail that may still become a stop string."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class StopStringMatcher:
    """Filters a text stream: `feed` returns the part that is safe to show.

    Generation stops at the stop string that is *completed* first (the earliest match end; on a tie,
    the longest one), which is where character-by-character generation would have stopped whatever the
    token boundaries. Its text is dropped unless `include_stop_str_in_output`; nothing after it is ever
    returned. Without inclusion, a tail that is a proper prefix of some stop string is held back until
    later text decides it.

    Each stop string has a KMP automaton whose state is the longest suffix of the text so far that is
    a proper prefix of it, so a call's work is O(new text x number of stop strings), amortized, however
    long the stop strings or the held-back tail (`work` counts the steps). The automata's failure links
    are computed lazily, only as deep as the text has matched, so a long stop string costs nothing
    until the text follows it.
    """

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            raise TypeError("stop must be a sequence of strings, not a single string")
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._automata = [_PrefixAutomaton(s) for s in dict.fromkeys(stop)]
        self._include = include_stop_str_in_output
        # Text received but not yet returned (a possible stop-string start; never in inclusion mode).
        self._held = _TextQueue()
        # The stop string that ended the stream, once one did.
        self.stop_reason: str | None = None
        # Automaton steps taken so far: proportional to the text fed (amortized).
        self.work = 0

    def feed(self, text: str, final: bool = False, can_stop: bool = True) -> str:
        """Take new text; return what may be shown now. `final` releases any held-back tail.
        can_stop=False: no stop string may end in this text (it still may start in it)."""
        if self.stop_reason is not None:
            return ""
        if not self._automata:
            return text
        match = self._scan(text, can_stop)
        if match is not None:
            end, stop = match
            self.stop_reason = stop
            if self._include:
                return text[:end]
            # The match starts in the held tail or in the new text (a longer start would have been held).
            held = len(self._held)
            start = held + end - len(stop)
            released = self._held.pop(min(start, held)) + text[: max(0, start - held)]
            self._held.clear()
            return released
        if self._include:
            return text
        self._held.push(text)
        if final:
            # The released tail no longer counts as a possible stop-string start.
            for automaton in self._automata:
                automaton.state = 0
            return self._held.pop(len(self._held))
        undecided = max(automaton.state for automaton in self._automata)
        return self._held.pop(len(self._held) - undecided)

    def _scan(self, text: str, can_stop: bool) -> tuple[int, str] | None:
        """Advance every automaton over `text`; (end in text, stop) of the match completed first,
        the longest on a tie, if one may end here."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for automaton in self._automata:
            end = automaton.advance(text, can_stop)
            self.work += automaton.take_work()
            if end >= 0:
                stop = automaton.stop
                candidate = (end, -len(stop), stop)
                if best is None or candidate < best:
                    best = candidate
        return None if best is None else (best[0], best[2])


class _PrefixAutomaton:
    """KMP matcher of one stop string over a stream; `state` is the length of the longest suffix of
    the text so far that is a proper prefix of the stop string."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.state = 0
        # Prefix function, computed on demand: _border[i] is the longest proper border of stop[: i + 1].
        self._border = [0]
        self._work = 0

    def take_work(self) -> int:
        work, self._work = self._work, 0
        return work

    def advance(self, text: str, can_stop: bool) -> int:
        """Feed `text`; the end (in text) of the first match when can_stop, else -1. After a match
        the state is meaningless (the stream ends there)."""
        stop, state, border = self.stop, self.state, self._border
        size = len(stop)
        # Two C-speed shortcuts for the usual cases: the text goes on following the stop string
        # (without completing it), or nothing in it can start one.
        if state + len(text) < size and stop.startswith(text, state):
            self.state, self._work = state + len(text), self._work + len(text)
            return -1
        start = text.find(stop[0]) if state == 0 else 0
        if start < 0:
            self._work += len(text)
            return -1
        work = start
        for index in range(start, len(text)):
            char = text[index]
            while state and stop[state] != char:
                if state > len(border):  # computed only once a mismatch needs it
                    work += self._extend_border(state - 1)
                state = border[state - 1]
                work += 1
            work += 1
            if stop[state] == char:
                state += 1
                if state == size:
                    if can_stop:
                        self.state, self._work = state, self._work + work
                        return index + 1
                    work += self._extend_border(size - 1)
                    state = border[size - 1]
        self.state, self._work = state, self._work + work
        return -1

    def _extend_border(self, last: int) -> int:
        """Compute the prefix function up to index `last`; returns the steps taken (amortized O(1)
        per index)."""
        stop, border, work = self.stop, self._border, 0
        for index in range(len(border), last + 1):
            length = border[index - 1]
            while length and stop[index] != stop[length]:
                length = border[length - 1]
                work += 1
            work += 1
            border.append(length + 1 if stop[index] == stop[length] else 0)
        return work


class _TextQueue:
    """Characters in arrival order, taken from the front: each character is copied O(1) times, so
    pushing and popping cost O(their own text), however long the queue."""

    def __init__(self) -> None:
        self._chunks: deque[str] = deque()
        self._offset = 0  # characters of the first chunk already popped
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, text: str) -> None:
        if text:
            self._chunks.append(text)
            self._size += len(text)

    def pop(self, count: int) -> str:
        """Remove and return the first `count` characters."""
        parts: list[str] = []
        self._size -= count
        while count:
            chunk = self._chunks[0]
            available = len(chunk) - self._offset
            if available > count:
                parts.append(chunk[self._offset : self._offset + count])
                self._offset += count
                break
            parts.append(chunk[self._offset :] if self._offset else chunk)
            self._chunks.popleft()
            self._offset = 0
            count -= available
        return "".join(parts)

    def clear(self) -> None:
        self._chunks.clear()
        self._offset = self._size = 0
