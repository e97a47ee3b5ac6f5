"""Test helpers for the scheduler: a fake model runner that really reads and writes a paged KV
cache, the matching reference generation, and a step driver that checks every step's contract."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from batchlm.core.scheduler import Scheduler
from batchlm.core.scheduler_config import SchedulerConfig
from batchlm.core.step_io import ModelRunnerOutput, SchedulerOutput
from batchlm.outputs import EngineCoreOutput, FinishReason
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams

# Generated tokens fall in [FIRST_TOKEN, VOCAB); prompts may use anything below VOCAB.
FIRST_TOKEN = 10
VOCAB = 1000
_MODULUS = (1 << 61) - 1
_ROOT_STATE = 12345


def mix(previous: int, token: int) -> int:
    """The fake 'key/value' of a position: a digest of the token and the previous position's."""
    return (previous * 1_000_003 + token + 1) % _MODULUS


def next_token(kv_state: int) -> int:
    return FIRST_TOKEN + kv_state % (VOCAB - FIRST_TOKEN)


def reference_generation(prompt: Sequence[int], num_tokens: int) -> list[int]:
    """What the fake runner generates for a prompt when nothing is shared, evicted or preempted."""
    state, out = _ROOT_STATE, []
    for token in prompt:
        state = mix(state, token)
    for _ in range(num_tokens):
        token = next_token(state)
        out.append(token)
        state = mix(state, token)
    return out


class PagedFakeRunner:
    """Stands in for the model runner. Each new token's slot stores mix(previous slot, token), where
    the previous slot is read back through the block table, so a wrong table, a block reused while
    still in use, or a bad prefix share changes the sampled tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[int | None] = [None] * (num_blocks * block_size)
        # Request id -> all tokens the runner knows (prompt + outputs), like the real runner's state.
        self.tokens: dict[str, list[int]] = {}
        # Request id -> its block table, built from the chunks' appended block ids.
        self.tables: dict[str, list[int]] = {}

    def _slot(self, block_ids: Sequence[int], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in step.finished_request_ids:
            self.tokens.pop(request_id, None)
            self.tables.pop(request_id, None)
        for new in step.new_requests:
            assert new.request_id not in self.tokens, f"{new.request_id} re-sent without being dropped"
            self.tokens[new.request_id] = [*new.prompt_token_ids, *new.output_token_ids]
        sampled_ids, sampled = [], []
        for chunk in step.chunks:
            known = self.tokens[chunk.request_id]
            end = chunk.start_position + len(chunk.token_ids)
            assert tuple(known[chunk.start_position : end]) == chunk.token_ids, "wrong tokens fed"
            assert chunk.sample == (end == len(known)), "sample flag disagrees with the token count"
            table = self.tables.setdefault(chunk.request_id, [])
            table.extend(chunk.new_block_ids)
            state = self._run_chunk(table, chunk.start_position, chunk.token_ids)
            if chunk.sample:
                token = next_token(state)
                known.append(token)
                sampled_ids.append(chunk.request_id)
                sampled.append(token)
        return ModelRunnerOutput(tuple(sampled_ids), tuple(sampled), (None,) * len(sampled))

    def _run_chunk(self, block_ids: Sequence[int], start: int, token_ids: Sequence[int]) -> int:
        state = _ROOT_STATE
        if start > 0:
            previous = self.slots[self._slot(block_ids, start - 1)]
            assert previous is not None, "attending to a slot that was never written"
            state = previous
        for offset, token in enumerate(token_ids):
            state = mix(state, token)
            self.slots[self._slot(block_ids, start + offset)] = state
        return state


def make_request(
    request_id: str,
    prompt: Sequence[int],
    max_tokens: int | None = 8,
    eos: Sequence[int] = (),
    **params: object,
) -> EngineCoreRequest:
    sampling = SamplingParams(max_tokens=max_tokens, **params)  # type: ignore[arg-type]
    return EngineCoreRequest(request_id, tuple(prompt), sampling, tuple(eos), arrival_time=0.0)


@dataclass
class Trace:
    """Everything a driven run produced."""

    steps: list[SchedulerOutput] = field(default_factory=list)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish: dict[str, FinishReason] = field(default_factory=dict)
    first_outputs: dict[str, EngineCoreOutput] = field(default_factory=dict)


class Driver:
    """Runs scheduler + fake runner step by step, checking each step against the config's limits."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.scheduler = Scheduler(config)
        self.runner = PagedFakeRunner(config.num_blocks, config.block_size)
        self.trace = Trace()
        # The block tables as sent so far (what a runner rebuilds from the appends).
        self.sent_tables: dict[str, list[int]] = {}
        # Requests whose tokens arrive all at once, at the finish.
        self.final_output_only: set[str] = set()

    def add(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(request)
        self.trace.tokens[request.request_id] = []
        if request.final_output_only:
            self.final_output_only.add(request.request_id)

    def step(self) -> SchedulerOutput:
        scheduled = self.scheduler.schedule()
        self.check_step(scheduled)
        result = self.runner.execute(scheduled)
        self.record(self.scheduler.update_from_output(scheduled, result))
        self.trace.steps.append(scheduled)
        return scheduled

    def run(self, max_steps: int = 10_000) -> Trace:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return self.trace
            self.step()
        raise AssertionError(f"requests still unfinished after {max_steps} steps")

    def record(self, outputs: list[EngineCoreOutput]) -> None:
        for output in outputs:
            self.trace.first_outputs.setdefault(output.request_id, output)
            self.trace.tokens[output.request_id].extend(output.new_token_ids)
            if output.finish_reason is not None:
                assert output.request_id not in self.trace.finish, "finished twice"
                self.trace.finish[output.request_id] = output.finish_reason

    def check_step(self, scheduled: SchedulerOutput) -> None:
        chunk_ids = [c.request_id for c in scheduled.chunks]
        assert len(set(chunk_ids)) == len(chunk_ids), "a request scheduled twice in one step"
        assert scheduled.num_tokens <= self.config.max_num_batched_tokens
        assert len(chunk_ids) <= self.config.max_num_seqs
        assert self.scheduler.stats().num_running <= self.config.max_num_seqs
        sizes = [len(c.token_ids) for c in scheduled.chunks]
        assert sizes == sorted(sizes, key=lambda n: n > 1), "a prefill chunk ahead of a decode"
        new_ids = {new.request_id for new in scheduled.new_requests}
        assert not new_ids & scheduled.finished_request_ids, "dropped and re-sent in the same step"
        for new in scheduled.new_requests:
            # A resumed request brings back exactly the tokens it had generated.
            if new.request_id not in self.final_output_only:
                assert list(new.output_token_ids) == self.trace.tokens[new.request_id]
        for request_id in scheduled.finished_request_ids:
            self.sent_tables.pop(request_id, None)
        for chunk in scheduled.chunks:
            end = chunk.start_position + len(chunk.token_ids)
            table = self.sent_tables.setdefault(chunk.request_id, [])
            table.extend(chunk.new_block_ids)
            assert len(table) == -(-end // self.config.block_size), "table not sized to the tokens"
            assert table == self.scheduler.kv.block_ids(chunk.request_id), "the appends miss the table"


def varied_prompts(count: int, length: int = 11, shared: int = 0) -> list[list[int]]:
    """`count` different prompts of `length` tokens after `shared` tokens they all begin with."""
    base = [(7 * i + 3) % 500 for i in range(shared)]
    return [base + [(31 * r + 17 * i + 5) % 500 for i in range(length)] for r in range(count)]


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    assert scheduler.num_free_blocks == scheduler.num_total_blocks
    assert scheduler.stats().kv_cache_usage == 0.0
    assert scheduler.num_inflight_steps == 0
