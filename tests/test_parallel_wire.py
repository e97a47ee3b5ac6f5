"""The tensor-parallel step encoding: every decoded step equals the scheduled one, and a steady decode
step (no block appended) carries no block ids."""

from __future__ import annotations

import pickle
import random

import pytest

from batchlm.core.step_io import NewRequestData, ScheduledChunk, SchedulerOutput
from batchlm.executor.wire import decode_step, encode_step
from batchlm.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0.5, max_tokens=8)


class FakeSchedule:
    """Requests whose block tables grow, get replaced (preemption) or disappear (finish) at random;
    each chunk carries the blocks appended since the request's last chunk."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tables: dict[str, tuple[int, ...]] = {}
        self.sent: dict[str, int] = {}
        self.next_id = 0
        self.next_block = 0

    def _blocks(self, count: int) -> tuple[int, ...]:
        self.next_block += count
        return tuple(range(self.next_block - count, self.next_block))

    def step(self) -> SchedulerOutput:
        finished = {rid for rid in self.tables if self.rng.random() < 0.15}
        for rid in finished:
            del self.tables[rid]
            del self.sent[rid]
        new = []
        for _ in range(self.rng.randint(0, 3)):
            rid = f"req-{self.next_id}"
            self.next_id += 1
            self.tables[rid], self.sent[rid] = self._blocks(self.rng.randint(1, 4)), 0
            prompt = tuple(self.rng.randrange(100) for _ in range(self.rng.randint(1, 9)))
            new.append(NewRequestData(rid, prompt, (), PARAMS, None, (2,)))
        preempted = {
            rid for rid in self.tables if rid not in {n.request_id for n in new} and self.rng.random() < 0.1
        }
        chunks = []
        for rid in sorted(self.tables):
            roll = self.rng.random()
            if rid in preempted:  # dropped and re-sent the same step with a fresh table
                self.tables[rid], self.sent[rid] = self._blocks(2), 0
                new.append(NewRequestData(rid, (1, 2, 3), (4,), PARAMS, 7, (2,)))
            elif roll < 0.3:
                self.tables[rid] += self._blocks(1)
            appended = self.tables[rid][self.sent[rid] :]
            self.sent[rid] = len(self.tables[rid])
            chunks.append(ScheduledChunk(rid, (self.rng.randrange(100),), 5, appended, roll < 0.9))
        return SchedulerOutput(tuple(chunks), tuple(new), frozenset(finished | preempted))


@pytest.mark.parametrize("seed", range(5))
def test_every_decoded_step_equals_the_scheduled_one(seed: int) -> None:
    schedule = FakeSchedule(seed)
    for _ in range(200):
        scheduled = schedule.step()
        assert decode_step(encode_step(scheduled)) == scheduled


def test_a_steady_decode_step_sends_no_block_ids() -> None:
    def step(tables: bool) -> SchedulerOutput:
        chunks = tuple(
            ScheduledChunk(f"r{i}", (i,), 1024, tuple(range(65 * i, 65 * i + 65)) if tables else (), True)
            for i in range(64)
        )
        return SchedulerOutput(chunks, (), frozenset())

    first, steady = encode_step(step(tables=True)), encode_step(step(tables=False))
    assert len(steady) < len(first) / 4
    assert len(steady) < len(pickle.dumps(step(tables=True))) / 4
    assert len(steady) < len(pickle.dumps(step(tables=False)))  # tuples beat dataclasses
    wire_chunks = pickle.loads(steady)[0]
    assert all(appended == () for *_, appended, _sample in wire_chunks)


def test_a_step_with_block_copies_and_finished_requests_round_trips() -> None:
    chunk = ScheduledChunk("a", (1, 2), 0, (9,), True)
    step = SchedulerOutput((chunk,), (), frozenset({"b", "c"}), block_copies=((1, 2),))
    assert decode_step(encode_step(step)) == step
