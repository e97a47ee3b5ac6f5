"""Grammar masks handed to the device: once a prefetch is known to advance every sequence of the next
step by its one token, the engine thread queues the step's sampling behind a flag the mask worker
releases, instead of waiting for the masks. A ThreadFlag stands in for the CUDA stream here: its wait
blocks the caller until the release, as the stream would."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future

import jsonschema
import numpy as np
import pytest

import batchlm.runner.model_runner as model_runner_module
from batchlm import LLM, SamplingParams
from batchlm.core.step_io import PLACEHOLDER_TOKEN_ID
from batchlm.request import EngineCoreRequest
from batchlm.runner.grammar import PrefetchJob, StartedMasks, StepMasks
from batchlm.runner.host_flag import ThreadFlag
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.llguidance_backend import LLGuidanceBackend
from batchlm.structured.sequences import ConstrainedSequences
from batchlm.structured.step_masks import PrefetchedMasks, SampledRows
from staggered_requests import REQUESTS, Served, serve_staggered

EOS = (1, 3)
SPEC = StructuredOutputs(regex="[a-z]{1,80}")


@pytest.fixture(scope="module")
def backend(tiny_tokenizer) -> LLGuidanceBackend:
    return LLGuidanceBackend.from_hf(tiny_tokenizer.hf, 2080, EOS)


class CountingFlag(ThreadFlag):
    def __init__(self) -> None:
        super().__init__()
        self.waited: list[int] = []

    def wait_on_device(self, ticket: int) -> None:
        self.waited.append(ticket)
        super().wait_on_device(ticket)


class LandingStep:
    """A launched step's tokens as the runner's PendingStepOutput shows them: a placeholder appended
    to each sampled sequence now, the token ids readable by the worker, written in by land()."""

    def __init__(self, lists: list[list[int]], tokens: list[int]) -> None:
        self._lists, self._tokens = lists, tokens
        self.positions = tuple(len(tokens_so_far) for tokens_so_far in lists)
        for tokens_so_far in lists:
            tokens_so_far.append(PLACEHOLDER_TOKEN_ID)

    def peek_token_ids(self) -> list[int]:
        return list(self._tokens)

    def land(self) -> None:
        for tokens_so_far, position, token in zip(self._lists, self.positions, self._tokens, strict=True):
            tokens_so_far[position] = token


def expected_mask(backend: LLGuidanceBackend, spec: StructuredOutputs, tokens: list[int]) -> np.ndarray:
    matcher, row = backend.matcher(spec), np.empty(backend.bitmask_words, dtype=np.int32)
    for token in tokens:
        assert matcher.accept(token)
    matcher.fill_bitmask(row)
    return row


def test_steady_steps_hand_their_masks_to_the_device_and_changes_wait_on_the_host(
    backend, tiny_tokenizer
) -> None:
    letter = {c: tiny_tokenizer.encode(c, add_special_tokens=False)[0] for c in "abc"}
    # Each sequence spells its own cycle, so each one's mask tells it from the others.
    cycles = {"r0": "abc", "r1": "bca", "r2": "cab"}
    specs = {rid: StructuredOutputs(regex=f"({cycle}){{1,40}}") for rid, cycle in cycles.items()}
    sequences = ConstrainedSequences(lambda eos: backend)
    flag = CountingFlag()
    masks = StepMasks(sequences, lambda rows: np.empty((rows, backend.bitmask_words), dtype=np.int32), flag)
    request_ids = ("r0", "r1", "r2")
    lists: dict[str, list[int]] = {rid: [] for rid in request_ids}
    for request_id, tokens in lists.items():
        sequences.add(request_id, specs[request_id], tokens, EOS)
    waits_by_step = []

    for number in range(6):
        if number == 4:  # r1 leaves: the batch changes, so the host takes the masks again
            sequences.drop(["r1"])
            request_ids = ("r0", "r2")
        started = masks.start(request_ids)
        grammar = masks.result(started, lambda: None)
        assert grammar is not None
        waits_by_step.append(len(flag.waited))
        for row, rid in enumerate(request_ids):
            expected = expected_mask(backend, specs[rid], lists[rid])
            assert np.array_equal(grammar.bitmask[row], expected), (number, rid)
        rows = [lists[rid] for rid in request_ids]
        sampled = [letter[cycles[rid][len(lists[rid]) % 3]] for rid in request_ids]
        landing = LandingStep(rows, sampled)
        masks.prefetch(started, landing)  # type: ignore[arg-type]
        landing.land()
    # Computed at once, then a prefetch seen to be complete, then complete by induction: the device.
    assert waits_by_step == [0, 0, 1, 2, 2, 2]
    last = masks.result(masks.start(request_ids), lambda: None)  # the sixth prefetch, by the device too
    assert last is not None and len(flag.waited) == 3
    for row, rid in enumerate(request_ids):
        assert np.array_equal(last.bitmask[row], expected_mask(backend, specs[rid], lists[rid]))
    masks.settle()
    assert flag.value == 6, "every prefetch released its own ticket"
    sequences.close()


def test_a_failed_prefetch_releases_its_flag_and_fails_the_next_settle(backend) -> None:
    sequences = ConstrainedSequences(lambda eos: backend)
    flag = ThreadFlag()
    tokens: list[int] = []
    sequences.add("r0", SPEC, tokens, EOS)

    def lost() -> list[int]:
        raise RuntimeError("the device is gone")

    out = np.empty((1, backend.bitmask_words), dtype=np.int32)
    future = sequences.prefetch_masks(SampledRows(["r0"], [0], [0]), lost, out, lambda: flag.release(7))
    assert isinstance(future.exception(), RuntimeError)
    assert flag.value == 7, "a device waiting for the failed job must not wait forever"
    sequences.close()


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "level": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
    },
    "required": ["name", "level", "tags"],
    "additionalProperties": False,
}


def test_an_engine_handing_masks_to_its_stream_samples_the_tokens_of_one_that_waits(
    tiny_model_dir, monkeypatch
) -> None:
    """The async CPU engine with a flag gives the tokens of the synchronous engine, constrained rows
    (greedy and seeded) valid and unconstrained ones beside them unchanged, with most steps' masks
    handed over."""
    model_dir = tiny_model_dir("llama")
    spec = StructuredOutputs(json=json.dumps(SCHEMA))
    params = [
        SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=spec),
        SamplingParams(temperature=1.0, seed=3, max_tokens=80, structured_outputs=spec),
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=4, max_tokens=80, structured_outputs=spec),
    ]
    prompts = ["Describe a player:", "JSON:", "plain text", "another one"]
    reference = LLM(model=str(model_dir), device="cpu").generate(prompts, params)
    flags: list[CountingFlag] = []
    monkeypatch.setattr(
        model_runner_module, "stream_flag", lambda device: flags.append(CountingFlag()) or flags[-1]
    )
    handing = LLM(model=str(model_dir), device="cpu", async_scheduling="on")
    assert handing.engine_core.async_scheduling
    outputs = handing.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in reference]
    for index in (0, 1, 3):
        jsonschema.validate(json.loads(outputs[index].outputs[0].text), SCHEMA)
    steps = max(len(o.outputs[0].token_ids) for o in outputs)
    assert len(flags) == 1 and len(flags[0].waited) >= steps // 2, (len(flags[0].waited), steps)
    assert handing.engine_core.executor.masks.steps_handed_to_device == len(flags[0].waited)


def _handing_masks() -> StepMasks:
    flag = ThreadFlag()
    flag.release(1)
    return StepMasks(ConstrainedSequences(lambda eos: None), lambda rows: np.empty((rows, 2), np.int32), flag)


def _hand(masks: StepMasks, future: Future[PrefetchedMasks]) -> np.ndarray:
    """Hand StepMasks a prefetch of one sequence known to be complete; the bitmask it was given."""
    bitmask = np.zeros((1, 2), dtype=np.int32)
    job = PrefetchJob(future, ("r0",), (5,), bitmask, ticket=1, complete=True)
    grammar = masks.result(StartedMasks((0,), ("r0",), None, job), lambda: None)
    assert grammar is not None and grammar.bitmask is bitmask
    return bitmask


FAILED = RuntimeError("llguidance failed")
SKIPPED_ONE = PrefetchedMasks({}, np.zeros((0, 2), dtype=np.int32), complete=False)


@pytest.mark.parametrize("outcome", [FAILED, SKIPPED_ONE])
def test_a_handed_job_that_failed_or_skipped_a_sequence_raises(outcome) -> None:
    pattern = r"llguidance failed|did not advance every sequence"
    # Finished before it is handed over: checked at once.
    finished: Future[PrefetchedMasks] = Future()
    if isinstance(outcome, BaseException):
        finished.set_exception(outcome)
    else:
        finished.set_result(outcome)
    with pytest.raises(RuntimeError, match=pattern):
        _hand(_handing_masks(), finished)
    # Still running when handed over: checked when the matchers are needed again.
    masks, running = _handing_masks(), Future()
    _hand(masks, running)
    assert masks.steps_handed_to_device == 1
    if isinstance(outcome, BaseException):
        running.set_exception(outcome)
    else:
        running.set_result(outcome)
    with pytest.raises(RuntimeError, match=pattern):
        masks.settle()
    masks.settle()  # reported once


@pytest.fixture
def handing_engine(tiny_model_dir, monkeypatch):
    """An async CPU engine whose masks go through a ThreadFlag, as a GPU engine's go through its stream."""
    monkeypatch.setattr(model_runner_module, "stream_flag", lambda device: ThreadFlag())

    def make(**kwargs) -> LLM:
        llm = LLM(model=str(tiny_model_dir("llama")), device="cpu", async_scheduling="on", **kwargs)
        assert llm.engine_core.async_scheduling
        return llm

    return make


def test_preemption_under_handed_masks_keeps_the_tokens(tiny_model_dir, handing_engine) -> None:
    spec = StructuredOutputs(json=json.dumps(SCHEMA))
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=80, structured_outputs=spec)
    prompts = [f"person {i}" + " again" * i for i in range(6)]
    reference = LLM(model=str(tiny_model_dir("llama")), device="cpu").generate(prompts, params)
    # 40 blocks of 4 tokens: some requests are preempted and recomputed while others decode.
    small = handing_engine(block_size=4, num_gpu_blocks_override=40)
    outputs = small.generate(prompts, params)
    assert small.engine_core.stats().num_preemptions > 0
    assert small.engine_core.executor.masks.steps_handed_to_device > 0
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in reference]
    for output in outputs:
        jsonschema.validate(json.loads(output.outputs[0].text), SCHEMA)


def test_aborts_under_handed_masks_free_their_matchers(handing_engine) -> None:
    llm = handing_engine()
    core, runner = llm.engine_core, llm.engine_core.executor
    spec = StructuredOutputs(json=json.dumps(SCHEMA))
    eos = llm.tokenizer.eos_token_ids
    for index in range(3):
        params = SamplingParams(temperature=1.0, seed=index, max_tokens=80, structured_outputs=spec)
        core.add_request(EngineCoreRequest(f"abort-{index}", (0, 5, 6 + index), params, eos, time.time()))
    for _ in range(6):
        core.step()
    assert runner.masks.steps_handed_to_device > 0, "steady steps hand their masks over"
    core.abort_requests(["abort-0", "abort-2"])
    while core.has_work():
        core.step()
    core.step()  # the finished request's drop reaches the runner with the next step
    assert len(runner.grammars) == 0


def test_staggered_requests_under_handed_masks_keep_the_tokens(tiny_model_dir, monkeypatch) -> None:
    """Requests arriving every few steps and ending at different lengths, as a server sees them: the
    batch's constrained sequences change most steps, each change going back to the host, and the runs
    of steady steps between are handed over; the tokens are those of the same engine without a flag."""
    spec = StructuredOutputs(json=json.dumps(SCHEMA))

    def serve(flag: CountingFlag | None) -> tuple[Served, LLM]:
        monkeypatch.setattr(model_runner_module, "stream_flag", lambda device: flag)
        llm = LLM(model=str(tiny_model_dir("llama")), device="cpu", async_scheduling="on")
        return serve_staggered(llm, spec), llm

    flag = CountingFlag()
    waiting, _ = serve(None)
    handing, llm = serve(flag)
    assert handing.tokens == waiting.tokens
    assert len(handing.finish_reasons) == REQUESTS
    for request_id, reason in handing.finish_reasons.items():
        if reason == "stop":
            jsonschema.validate(json.loads(llm.tokenizer.decode(handing.tokens[request_id])), SCHEMA)
    handed = llm.engine_core.executor.masks.steps_handed_to_device
    assert 0 < handed == len(flag.waited), (handed, handing.steps)
