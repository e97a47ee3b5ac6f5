"""Admission is fair across API requests: the n sequences of one large-n request (or the prompts of
one batch) do not keep another request out of the batch until all of them have run."""

from __future__ import annotations

from dataclasses import replace

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from batchlm.core.scheduler_config import SchedulerConfig
from batchlm.engine.output_processor import make_core_requests
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams
from batchlm.server.background import BackgroundServer
from fake_engine import FakeEngine
from scheduler_harness import Driver, make_request, reference_generation


def siblings(group: str, n: int, prompt: list[int], max_tokens: int) -> list[EngineCoreRequest]:
    """The core requests the front end makes for one request with n completions."""
    return [replace(make_request(f"{group}:{i}", prompt, max_tokens), group_id=group) for i in range(n)]


def first_scheduled_step(driver: Driver, request_id: str, max_steps: int = 2000) -> int:
    for step in range(max_steps):
        if any(chunk.request_id == request_id for chunk in driver.step().chunks):
            return step
    raise AssertionError(f"{request_id} never scheduled")


def config(max_num_seqs: int) -> SchedulerConfig:
    return SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=512,
        max_model_len=256,
        block_size=4,
        num_blocks=4096,
    )


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    max_num_seqs=st.integers(1, 8),
    n=st.integers(2, 40),
    max_tokens=st.integers(1, 20),
    arrives_after=st.integers(0, 30),
)
def test_another_request_is_admitted_at_the_first_free_slot(
    max_num_seqs: int, n: int, max_tokens: int, arrives_after: int
) -> None:
    """Once the other request waits, at most one more sibling takes a freed slot before its turn, so
    it runs within two siblings' lifetimes (max_tokens steps each, the longest a slot stays taken),
    however many siblings still wait. First come, first served it would wait for all of them."""
    driver = Driver(config(max_num_seqs))
    for request in siblings("big", n, [5, 6, 7, 8, 9], max_tokens):
        driver.add(request)
    for _ in range(arrives_after):
        driver.step()
    driver.add(make_request("other", [1, 2, 3], max_tokens=4))
    assert first_scheduled_step(driver, "other") <= 2 * max_tokens + 2
    trace = driver.run()
    assert trace.tokens["other"] == reference_generation([1, 2, 3], 4)
    for i in range(n):
        assert trace.tokens[f"big:{i}"] == reference_generation([5, 6, 7, 8, 9], max_tokens)


def test_two_large_n_requests_share_the_batch() -> None:
    driver = Driver(config(8))
    for request in siblings("a", 32, [1, 2, 3], 10) + siblings("b", 32, [4, 5, 6], 10):
        driver.add(request)
    for _ in range(30):
        driver.step()
        running = [c.request_id.split(":")[0] for c in driver.trace.steps[-1].chunks]
        if len(running) == 8:
            assert abs(running.count("a") - running.count("b")) <= 1, running


def test_single_sequence_requests_stay_first_come_first_served() -> None:
    driver = Driver(config(2))
    for name in ("r0", "r1", "r2", "r3"):
        driver.add(make_request(name, [1, 2, 3], max_tokens=3))
    order = []
    for _ in range(20):
        for chunk in driver.step().chunks:
            if chunk.request_id not in order:
                order.append(chunk.request_id)
    assert order == ["r0", "r1", "r2", "r3"]


def test_a_requests_sequences_share_one_admission_group() -> None:
    params = SamplingParams(n=3, max_tokens=4)
    children = make_core_requests("req", [1, 2], params, (), 0.0)
    assert {child.group_id for child in children} == {"req"}
    assert make_core_requests("one", [1, 2], SamplingParams(max_tokens=4), (), 0.0)[0].group_id == ""
    batch = make_core_requests("batch-1", [1, 2], SamplingParams(max_tokens=4), (), 0.0, group_id="batch")
    assert batch[0].group_id == "batch"


def test_a_batch_of_prompts_is_one_admission_group() -> None:
    engine = FakeEngine()
    with BackgroundServer(engine) as server:
        url = f"{server.base_url}/v1/completions"
        batch = httpx.post(url, json={"prompt": ["a", "b", "c"], "max_tokens": 1}).json()
        single = httpx.post(url, json={"prompt": "a", "max_tokens": 1}).json()
    calls = {call.request_id: call.group_id for call in engine.calls}
    assert {calls[f"{batch['id']}-{i}"] for i in range(3)} == {batch["id"]}
    assert calls[single["id"]] == ""
