"""The synchronous engine core: schedule -> execute -> update, one step at a time. Never imports torch."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Protocol

from batchlm.core.scheduler import Scheduler, SchedulerStats
from batchlm.core.step_io import ModelRunnerOutput, SchedulerOutput
from batchlm.outputs import EngineCoreOutput
from batchlm.request import EngineCoreRequest

logger = logging.getLogger(__name__)


class Executor(Protocol):
    """Runs one scheduled step on the model (the model runner, or a set of tensor-parallel workers)."""

    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput: ...


class EngineCore:
    """Owns the scheduler and drives the executor. Single-threaded; transports live at the edge."""

    def __init__(self, scheduler: Scheduler, executor: Executor) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.num_steps = 0
        # Request id -> time it was first scheduled, until reported on its first output.
        self._first_scheduled: dict[str, float] = {}

    def add_request(self, request: EngineCoreRequest) -> None:
        """Raises ValueError when the request can never run (the caller reports it to the client)."""
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        request_ids = list(request_ids)
        for request_id in request_ids:
            self._first_scheduled.pop(request_id, None)
        return self.scheduler.abort_requests(request_ids)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty and not scheduled.finished_request_ids:
            return []
        now = time.time()
        for new in scheduled.new_requests:
            self._first_scheduled.setdefault(new.request_id, now)
        result = self.executor.execute(scheduled)
        self.num_steps += 1
        outputs = self.scheduler.update_from_output(scheduled, result)
        if self._first_scheduled:
            outputs = [self._with_scheduled_time(o) for o in outputs]
        return outputs

    def _with_scheduled_time(self, output: EngineCoreOutput) -> EngineCoreOutput:
        scheduled_at = self._first_scheduled.pop(output.request_id, None)
        if scheduled_at is None:
            return output
        return dataclasses.replace(output, scheduled_time=scheduled_at)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()
