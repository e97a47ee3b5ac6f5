"""Property-based tests of the block manager (pool + block tables) driven through the scheduler:
random interleavings of arrivals, steps, aborts (also mid-step) and the preemptions a small cache
forces. After every step: no leaked block, no double free, ref counts equal the number of tables
holding the block, free + evictable + used == total; at the end everything is free and every
surviving request generated exactly what it would have generated alone."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from batchlm.core.scheduler_config import SchedulerConfig
from batchlm.outputs import FinishReason
from scheduler_harness import Driver, make_request, reference_generation

BLOCK = 4
CONFIG = SchedulerConfig(
    max_num_seqs=4, max_num_batched_tokens=12, max_model_len=64, block_size=BLOCK, num_blocks=10
)
# Prompts are cut from a few shared bases so that prefixes (and whole prompts) repeat.
BASES = [[(base * 97 + i * 13) % 500 for i in range(20)] for base in range(3)]


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.driver = Driver(CONFIG)
        self.prompts: dict[str, list[int]] = {}
        self.max_tokens: dict[str, int] = {}
        self.aborted: set[str] = set()

    @property
    def live_ids(self) -> list[str]:
        done = self.aborted | self.driver.trace.finish.keys()
        return sorted(rid for rid in self.prompts if rid not in done)

    @rule(
        base=st.integers(0, len(BASES) - 1),
        length=st.integers(1, 20),
        last_token=st.none() | st.integers(500, 600),
        max_tokens=st.integers(1, 12),
    )
    def add(self, base: int, length: int, last_token: int | None, max_tokens: int) -> None:
        prompt = BASES[base][:length]
        if last_token is not None:
            prompt[-1] = last_token
        request_id = f"r{len(self.prompts)}"
        self.driver.add(make_request(request_id, prompt, max_tokens=max_tokens))
        self.prompts[request_id] = prompt
        self.max_tokens[request_id] = max_tokens

    @rule(count=st.integers(1, 4))
    def step(self, count: int) -> None:
        for _ in range(count):
            self.driver.step()

    @precondition(lambda self: self.live_ids)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(self.live_ids))
        [output] = self.driver.scheduler.abort_requests([request_id])
        assert output.finish_reason is FinishReason.ABORT
        self.aborted.add(request_id)

    @rule(data=st.data())
    def abort_mid_step(self, data: st.DataObject) -> None:
        """Abort a request after schedule() and before update_from_output(), as a client might."""
        scheduled = self.driver.scheduler.schedule()
        self.driver.check_step(scheduled)
        if scheduled.chunks:
            victim = data.draw(st.sampled_from([c.request_id for c in scheduled.chunks]))
            self.driver.scheduler.abort_requests([victim])
            self.aborted.add(victim)
        result = self.driver.runner.execute(scheduled)
        self.driver.record(self.driver.scheduler.update_from_output(scheduled, result))
        self.driver.trace.steps.append(scheduled)

    @invariant()
    def blocks_are_accounted_for(self) -> None:
        kv = self.driver.scheduler.kv
        pool = kv.pool
        holders = Counter(block for rid in self.live_ids for block in kv.block_ids(rid))
        free, evictable = list(pool.free_blocks()), list(pool.evictable_blocks())
        assert len(set(free)) == len(free) and len(set(evictable)) == len(evictable), "block listed twice"
        assert not set(free) & set(evictable)
        for block in range(pool.num_blocks):
            assert pool.ref_count(block) == holders[block], f"block {block} ref count != tables holding it"
            if holders[block]:
                assert block not in free and block not in evictable
        used = [block for block in range(pool.num_blocks) if holders[block]]
        assert len(free) + len(evictable) + len(used) == pool.num_blocks, "leaked block"
        assert all(pool.block_hash(block) is None for block in free)
        assert all(pool.block_hash(block) is not None for block in evictable)

    @invariant()
    def waiting_requests_hold_no_blocks(self) -> None:
        stats = self.driver.scheduler.stats()
        holding = [rid for rid in self.live_ids if self.driver.scheduler.kv.block_ids(rid)]
        assert len(holding) == stats.num_running
        assert len(self.live_ids) == stats.num_running + stats.num_waiting

    def teardown(self) -> None:
        self.driver.run(max_steps=2_000)
        stats = self.driver.scheduler.stats()
        event(f"preempted: {stats.num_preemptions > 0}")
        event(f"prefix hits: {stats.prefix_cache_hits > 0}")
        self.blocks_are_accounted_for()
        scheduler = self.driver.scheduler
        assert scheduler.num_free_blocks == scheduler.num_total_blocks
        assert scheduler.kv.usage == 0.0
        for request_id, prompt in self.prompts.items():
            if request_id in self.aborted:
                continue
            expected = reference_generation(prompt, self.max_tokens[request_id])
            assert self.driver.trace.tokens[request_id] == expected, (
                f"{request_id} generated different tokens"
            )


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManager = BlockManagerMachine.TestCase
