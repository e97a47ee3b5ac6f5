"""The engine core: schedule -> execute -> update, either one step at a time or with one step in flight
(async scheduling). Single-threaded, and never imports torch."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Protocol

from batchlm.core.facts import EngineStats
from batchlm.core.grammar_wait import GrammarCompiles
from batchlm.core.scheduler import Scheduler
from batchlm.core.step_io import ModelRunnerOutput, SchedulerOutput
from batchlm.outputs import CoreOutputs, EngineCoreOutput
from batchlm.request import EngineCoreRequest

logger = logging.getLogger(__name__)


class Executor(Protocol):
    """Runs one scheduled step on the model (the model runner, or a set of tensor-parallel workers)."""

    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput: ...


class PendingOutput(Protocol):
    """A launched step's output; result() waits for it."""

    def result(self) -> ModelRunnerOutput: ...


class AsyncExecutor(Executor, Protocol):
    """An executor that can queue a step and return before it finishes (the single-device runner)."""

    def execute_async(self, scheduled: SchedulerOutput) -> PendingOutput: ...


class EngineCore:
    """Owns the scheduler and drives the executor. Single-threaded; transports live at the edge.

    With async_scheduling, step() schedules and launches step N+1 before it waits for step N's
    tokens and folds them in, so the device never waits for the host's scheduling and input
    building. Outputs then arrive one step() call later than they would synchronously.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        executor: Executor,
        async_scheduling: bool = False,
        grammars: GrammarCompiles | None = None,
    ) -> None:
        """grammars: compiles constrained requests' grammars off this thread, the requests held back
        until theirs is ready (None: the runner compiles each one in the step that admits it)."""
        if async_scheduling and not callable(getattr(executor, "execute_async", None)):
            name = type(executor).__name__
            raise ValueError(f"async scheduling needs an executor with execute_async; {name} has none")
        self.scheduler = scheduler
        self.executor = executor
        self.async_scheduling = async_scheduling
        self.grammars = grammars
        self.num_steps = 0
        # Request id -> time it was first scheduled, until reported on its first output.
        self._first_scheduled: dict[str, float] = {}
        # Async scheduling: the launched step whose output has not been folded in yet.
        self._in_flight: tuple[SchedulerOutput, PendingOutput] | None = None

    def add_request(self, request: EngineCoreRequest) -> None:
        """Takes the request as validated; raises ValueError for an id already in use (the caller
        reports it to the client). A constrained request waits for its grammar, compiled meanwhile."""
        grammars = self.grammars
        if grammars is None or request.sampling_params.structured_outputs is None:
            self.scheduler.add_request(request)
            return
        self.scheduler.add_request(request, held=True)  # first: it raises for an id in use
        if grammars.start(request):
            self.scheduler.release((request.request_id,))

    def abort_requests(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        request_ids = list(request_ids)
        for request_id in request_ids:
            self._first_scheduled.pop(request_id, None)
        if self.grammars is not None:
            self.grammars.discard(request_ids)
        return self.scheduler.abort_requests(request_ids)

    def forget_steps_in_flight(self) -> None:
        """After a step was cut short (an error or Ctrl-C inside it) and every request aborted: the
        steps whose results were lost are forgotten, so the next step starts from a consistent state."""
        self._in_flight = None
        self._first_scheduled.clear()
        self.scheduler.forget_inflight_steps()

    def has_work(self) -> bool:
        """Requests to run, a step in flight, or ended requests to drop from the runner: the step that
        drops them (one with no chunks) must run before the core idles, or the runner would hold the
        last batch's states until the next request came."""
        scheduler = self.scheduler
        return (
            scheduler.has_unfinished_requests()
            or self._in_flight is not None
            or scheduler.has_requests_to_drop()
        )

    def can_step(self) -> bool:
        """has_work, less requests that only wait for their grammar: a step now would make progress
        rather than wait for a compile. A loop that also serves pipes waits on them and on
        `grammars.wakeup` instead of stepping while this is False."""
        scheduler = self.scheduler
        return (
            scheduler.has_requests_to_schedule()
            or self._in_flight is not None
            or scheduler.has_requests_to_drop()
            or (self.grammars is not None and self.grammars.has_done())
        )

    def step(self) -> CoreOutputs:
        """One step. With nothing else to do but requests waiting for their grammar, it first waits
        for one to be compiled."""
        outputs = self._take_grammars()
        if self.async_scheduling:
            outputs.extend(self._step_async())
            return outputs
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty and not scheduled.finished_request_ids:
            return outputs
        self._note_first_scheduled(scheduled)
        result = self.executor.execute(scheduled)
        self.num_steps += 1
        outputs.extend(self._update(scheduled, result))
        return outputs

    def _take_grammars(self) -> CoreOutputs:
        """Admit the requests whose grammar is ready now, and end those whose grammar failed."""
        outputs = CoreOutputs()
        grammars = self.grammars
        if grammars is None:
            return outputs
        if not self.can_step() and self.scheduler.has_unfinished_requests():
            grammars.wait_done()
        if not grammars.has_done():
            return outputs
        done = grammars.take_done()
        self.scheduler.release(done)
        failed = {request_id: error for request_id, error in done.items() if error is not None}
        if failed:
            for request_id in failed:
                self._first_scheduled.pop(request_id, None)
            for output in self.scheduler.end_with_errors(failed):
                outputs.append(output)
        return outputs

    def _step_async(self) -> CoreOutputs:
        """Launch the next step, then fold in the one launched by the previous call. When speculating
        requests need the step in flight (their last tokens to propose from, or a verify result), it
        is folded in first: otherwise they would sit out every other step."""
        outputs = CoreOutputs()
        if self._in_flight is not None and self.scheduler.needs_step_in_flight():
            (previous_scheduled, previous_pending), self._in_flight = self._in_flight, None
            outputs = self._update(previous_scheduled, previous_pending.result())
        scheduled = self.scheduler.schedule()
        launched = None
        if not scheduled.is_empty or scheduled.finished_request_ids:
            self._note_first_scheduled(scheduled)
            executor: AsyncExecutor = self.executor  # type: ignore[assignment]
            launched = executor.execute_async(scheduled)
            self.num_steps += 1
        previous = self._in_flight
        # A step with no chunks (only requests to drop) has no output to wait for.
        self._in_flight = (scheduled, launched) if launched is not None and not scheduled.is_empty else None
        if previous is not None:
            outputs.extend(self._update(previous[0], previous[1].result()))
        return outputs

    def _note_first_scheduled(self, scheduled: SchedulerOutput) -> None:
        now = time.time()
        for new in scheduled.new_requests:
            self._first_scheduled.setdefault(new.request_id, now)

    def _update(self, scheduled: SchedulerOutput, result: ModelRunnerOutput) -> CoreOutputs:
        outputs = self.scheduler.update_from_output(scheduled, result)
        if self._first_scheduled:
            for index, request_id in enumerate(outputs.request_ids):
                scheduled_at = self._first_scheduled.pop(request_id, None)
                if scheduled_at is not None:
                    outputs.set_scheduled_time(index, scheduled_at)
        return outputs

    def stats(self) -> EngineStats:
        return self.scheduler.stats()
