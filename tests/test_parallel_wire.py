"""The tensor-parallel step encoding: every decoded step equals the scheduled one, block tables travel
as appends, and remembered tables leave with their requests."""

from __future__ import annotations

import pickle
import random

import pytest

from batchlm.core.step_io import NewRequestData, ScheduledChunk, SchedulerOutput
from batchlm.engine.parallel_wire import StepDecoder, StepEncoder
from batchlm.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0.5, max_tokens=8)


class FakeSchedule:
    """Requests whose block tables grow, get replaced (preemption) or disappear (finish) at random."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tables: dict[str, tuple[int, ...]] = {}
        self.next_id = 0
        self.next_block = 0

    def _blocks(self, count: int) -> tuple[int, ...]:
        self.next_block += count
        return tuple(range(self.next_block - count, self.next_block))

    def step(self) -> SchedulerOutput:
        finished = {rid for rid in self.tables if self.rng.random() < 0.15}
        for rid in finished:
            del self.tables[rid]
        new = []
        for _ in range(self.rng.randint(0, 3)):
            rid = f"req-{self.next_id}"
            self.next_id += 1
            self.tables[rid] = self._blocks(self.rng.randint(1, 4))
            prompt = tuple(self.rng.randrange(100) for _ in range(self.rng.randint(1, 9)))
            new.append(NewRequestData(rid, prompt, (), PARAMS, None, (2,)))
        preempted = {
            rid for rid in self.tables if rid not in {n.request_id for n in new} and self.rng.random() < 0.1
        }
        chunks = []
        for rid in sorted(self.tables):
            roll = self.rng.random()
            if rid in preempted:  # dropped and re-sent the same step with a fresh table
                self.tables[rid] = self._blocks(2)
                new.append(NewRequestData(rid, (1, 2, 3), (4,), PARAMS, 7, (2,)))
            elif roll < 0.3:
                self.tables[rid] += self._blocks(1)
            chunks.append(ScheduledChunk(rid, (self.rng.randrange(100),), 5, self.tables[rid], roll < 0.9))
        return SchedulerOutput(tuple(chunks), tuple(new), frozenset(finished | preempted))


@pytest.mark.parametrize("seed", range(5))
def test_every_decoded_step_equals_the_scheduled_one(seed: int) -> None:
    schedule, encoder, decoder = FakeSchedule(seed), StepEncoder(), StepDecoder()
    for _ in range(200):
        scheduled = schedule.step()
        assert decoder.decode(encoder.encode(scheduled)) == scheduled
        assert encoder.num_tracked <= len(schedule.tables)


def test_a_steady_decode_step_sends_no_block_ids() -> None:
    chunks = tuple(
        ScheduledChunk(f"r{i}", (i,), 1024, tuple(range(65 * i, 65 * i + 65)), True) for i in range(64)
    )
    step = SchedulerOutput(chunks, (), frozenset())
    encoder = StepEncoder()
    first, second = encoder.encode(step), encoder.encode(step)
    assert len(second) < len(first) / 4
    assert len(second) < len(pickle.dumps(step)) / 4
    wire_chunks = pickle.loads(second)[0]
    assert all(kept == 65 and appended == () for *_, kept, appended in wire_chunks)


def test_finished_requests_are_forgotten() -> None:
    encoder, decoder = StepEncoder(), StepDecoder()
    chunk = ScheduledChunk("a", (1,), 0, (3, 4), True)
    decoder.decode(encoder.encode(SchedulerOutput((chunk,), (), frozenset())))
    assert encoder.num_tracked == 1
    decoder.decode(encoder.encode(SchedulerOutput((), (), frozenset({"a"}))))
    assert encoder.num_tracked == 0
    # Coming back under the same id (preempted and readmitted) with a different table is exact too.
    again = SchedulerOutput((ScheduledChunk("a", (1, 2), 0, (9,), True),), (), frozenset())
    assert decoder.decode(encoder.encode(again)) == again
