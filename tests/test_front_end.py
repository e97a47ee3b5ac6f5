"""The per-request output collector: a lagging stream gets merged deltas that add up to the same result."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batchlm.engine.client import EngineDeadError
from batchlm.engine.output_collector import RequestOutputCollector, merge_into
from batchlm.outputs import CompletionOutput, RequestOutput, TokenLogprobs


def delta(
    index: int,
    text: str,
    ids: list[int],
    finish: str | None = None,
    logprob: float | None = None,
    cached: int = 0,
) -> RequestOutput:
    logprobs = None if logprob is None else [TokenLogprobs(logprob, 1) for _ in ids]
    cumulative = None if logprob is None else logprob * len(ids)
    completion = CompletionOutput(index, text, ids, cumulative, logprobs, finish, None)
    return RequestOutput("r", "p", [1, 2], [completion], finish is not None, num_cached_tokens=cached)


def merge_deltas(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    merge_into(first, second)
    return first


def test_merge_joins_each_completion_and_keeps_the_later_state() -> None:
    first = delta(0, "Hel", [5, 6], logprob=-1.0, cached=16)
    second = delta(0, "lo", [7], finish="length", logprob=-0.5)
    merged = merge_deltas(first, second)
    (completion,) = merged.outputs
    assert completion.text == "Hello" and completion.token_ids == [5, 6, 7]
    assert completion.logprobs is not None and [lp.logprob for lp in completion.logprobs] == [
        -1.0,
        -1.0,
        -0.5,
    ]
    assert completion.finish_reason == "length" and merged.finished
    # cumulative_logprob is a running total: the later value already includes the earlier tokens.
    assert completion.cumulative_logprob == -0.5
    assert merged.num_cached_tokens == 16


def test_merge_keeps_completions_that_changed_in_only_one_delta_in_index_order() -> None:
    first = delta(1, "b", [2])
    second = delta(0, "a", [1])
    merged = merge_deltas(first, second)
    assert [(c.index, c.text) for c in merged.outputs] == [(0, "a"), (1, "b")]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_lagging_consumer_gets_everything_put_since_its_last_get_as_one_delta() -> None:
    async def scenario() -> tuple[RequestOutput, RequestOutput]:
        collector = RequestOutputCollector()
        collector.put(delta(0, "a", [1]))
        first = await collector.get()
        for item in (delta(0, "b", [2]), delta(0, "c", [3]), delta(0, "d", [4], finish="stop")):
            collector.put(item)
        return first, await collector.get()

    first, merged = run(scenario())
    assert first.outputs[0].text == "a"
    assert merged.outputs[0].text == "bcd" and merged.outputs[0].token_ids == [2, 3, 4]
    assert merged.finished


def test_an_error_comes_after_the_text_that_arrived_before_it() -> None:
    async def scenario() -> tuple[RequestOutput, BaseException | None]:
        collector = RequestOutputCollector()
        collector.put(delta(0, "a", [1]))
        collector.put(delta(0, "b", [2]))
        collector.fail(EngineDeadError("gone"))
        collector.fail(EngineDeadError("a later error is dropped"))
        merged = await collector.get()
        try:
            await collector.get()
        except EngineDeadError as error:
            return merged, error
        return merged, None

    merged, error = run(scenario())
    assert merged.outputs[0].text == "ab" and not merged.finished
    assert isinstance(error, EngineDeadError) and str(error) == "gone"


def test_a_get_waits_for_the_next_put() -> None:
    async def scenario() -> RequestOutput:
        collector = RequestOutputCollector()
        waiting = asyncio.ensure_future(collector.get())
        await asyncio.sleep(0)
        assert not waiting.done()
        collector.put(delta(0, "a", [1]))
        return await waiting

    assert run(scenario()).outputs[0].text == "a"


@pytest.mark.parametrize("finish", [None, "stop"])
def test_merging_many_deltas_one_at_a_time_equals_the_whole(finish: str | None) -> None:
    words = ["α", "β", "🙂", " x"]
    parts = [delta(0, w, [i]) for i, w in enumerate(words)] + [delta(0, "!", [99], finish=finish)]
    merged = parts[0]
    for part in parts[1:]:
        merged = merge_deltas(merged, part)
    assert merged.outputs[0].text == "".join(words) + "!"
    assert merged.outputs[0].token_ids == [0, 1, 2, 3, 99]
    assert merged.finished is (finish is not None)
