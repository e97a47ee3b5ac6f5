"""Turns for admission into the batch, so that one request's n sequences share it with the others."""

from __future__ import annotations

import itertools
from collections import Counter, deque
from typing import Protocol

from batchlm.core.request_state import RequestState
from batchlm.request import EngineCoreRequest


class AdmissionTickets:
    """A ticket per request (the scheduler admits the waiting sequence with the lowest one). A request
    takes its ticket when it arrives; the n sequences of a request with n > 1 share one, which goes to
    the back of the line (a new ticket) each time one of them is admitted. Requests with n = 1 keep
    theirs, so among them admission stays first come, first served, and a preempted one still goes
    back ahead of later arrivals."""

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._tickets: dict[str, int] = {}
        # Unfinished sequences per n > 1 request: its ticket is dropped with the last of them.
        self._group_sizes: Counter[str] = Counter()

    @property
    def num_groups(self) -> int:
        """Requests with n > 1 that still have unfinished sequences (none: plain FCFS applies)."""
        return len(self._group_sizes)

    def add(self, request: EngineCoreRequest) -> None:
        key = _key(request)
        if key not in self._tickets:
            self._tickets[key] = next(self._counter)
        if request.group_id:
            self._group_sizes[request.group_id] += 1

    def of(self, state: _HasRequest) -> int:
        return self.ticket(state.request)

    def ticket(self, request: EngineCoreRequest) -> int:
        return self._tickets[_key(request)]

    def next_in_line(
        self, waiting: deque[RequestState], held: set[str], returning: set[str] | None = None
    ) -> RequestState | None:
        """The waiting sequence whose turn it is: the lowest ticket, first come first served among
        equals. So the siblings of a large-n request take turns with the requests that arrived
        meanwhile instead of keeping them all out of the batch until every sibling has run. Held
        requests are passed over (None: all are). A `returning` one (back from its switch to the long
        rotation: it gave up no turn) goes first."""
        if returning:
            for state in waiting:
                if state.request_id in returning:
                    return state
        if held:
            candidates = (state for state in waiting if state.request_id not in held)
            if self._group_sizes:
                return min(candidates, key=self.of, default=None)
            # The first one not held: no scan of the whole queue for each admission.
            return next(candidates, None)
        if not self._group_sizes:
            return waiting[0]
        return min(waiting, key=self.of)

    def admitted(self, request: EngineCoreRequest) -> None:
        if request.group_id:
            self._tickets[request.group_id] = next(self._counter)

    def finished(self, request: EngineCoreRequest) -> None:
        group = request.group_id
        if not group:
            self._tickets.pop(request.request_id, None)
            return
        self._group_sizes[group] -= 1
        if self._group_sizes[group] <= 0:
            del self._group_sizes[group]
            self._tickets.pop(group, None)


class _HasRequest(Protocol):
    request: EngineCoreRequest


def _key(request: EngineCoreRequest) -> str:
    return request.group_id or request.request_id
