"""Requests held back while their grammar compiles: the others are admitted past them, in their turn,
and a held request is admitted in its own turn once released."""

from __future__ import annotations

from batchlm.core.scheduler import Scheduler
from batchlm.core.scheduler_config import SchedulerConfig
from scheduler_harness import make_request

CONFIG = SchedulerConfig(
    max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, block_size=4, num_blocks=64
)


def _admitted(scheduler: Scheduler) -> list[str]:
    return [chunk.request_id for chunk in scheduler.schedule().chunks]


def test_held_requests_are_passed_over_until_released() -> None:
    scheduler = Scheduler(CONFIG)
    scheduler.add_request(make_request("held", [1, 2, 3]), held=True)
    scheduler.add_request(make_request("a", [1, 2, 4]))
    assert scheduler.has_requests_to_schedule()
    assert _admitted(scheduler) == ["a"]
    scheduler.release(["held"])
    assert _admitted(scheduler) == ["a", "held"]


class _CountingSet(set[str]):
    """A set that counts its membership tests."""

    lookups = 0

    def __contains__(self, item: object) -> bool:
        _CountingSet.lookups += 1
        return super().__contains__(item)


def test_admission_past_a_held_request_does_not_scan_the_whole_queue() -> None:
    # With a long queue and one request held at its back, each admission looked at every waiting
    # request: admitting a queue of N cost N^2 while any grammar compiled.
    scheduler = Scheduler(CONFIG)
    for index in range(200):
        scheduler.add_request(make_request(f"r{index}", [1, 2, index + 3]))
    scheduler.add_request(make_request("held", [1, 2, 3]), held=True)
    scheduler._held = _CountingSet(scheduler._held)
    _CountingSet.lookups = 0
    assert _admitted(scheduler) == ["r0", "r1", "r2", "r3"]
    assert _CountingSet.lookups <= 2 * CONFIG.max_num_seqs


def test_an_aborted_held_request_leaves_nothing_held() -> None:
    scheduler = Scheduler(CONFIG)
    scheduler.add_request(make_request("held", [1, 2, 3]), held=True)
    assert not scheduler.has_requests_to_schedule() and scheduler.has_unfinished_requests()
    [output] = scheduler.abort_requests(["held"])
    assert output.finished and not scheduler.has_unfinished_requests()
    # The id is free again, and a request that reuses it is not held.
    scheduler.add_request(make_request("held", [1, 2, 3]))
    assert scheduler.has_requests_to_schedule() and _admitted(scheduler) == ["held"]
