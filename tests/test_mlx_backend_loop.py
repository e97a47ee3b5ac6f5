"""Tests for batchlm.backends.mlx.loop: the GenerationLoop over mlx-lm's BatchGenerator on a tiny
random-weight model (greedy equals transformers, batching cap, stops, aborts, prefix reuse, logprobs)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import batchlm.backends.mlx  # noqa: F401  (first: it imports mlx-lm, keeping the open-file limit)

pytest.importorskip("mlx_lm")

from batchlm.backends.mlx.loader import LoadedModel, load_model
from batchlm.backends.mlx.loop import GenerationLoop, LoopSettings
from batchlm.config import EngineConfig
from batchlm.core.facts import EngineStats
from batchlm.outputs import EngineCoreOutput, FinishReason
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams

EOS = (1, 3)
PROMPTS = [
    [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
    [0, 20, 21],
    [0, 40],
    [0, 50, 51, 52, 53, 54],
    [0, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69],
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Callable[..., Path]) -> LoadedModel:
    directory = tiny_model_dir("llama")
    return load_model(EngineConfig(model=str(directory)), directory)


def make_loop(loaded: LoadedModel, **changes: Any) -> GenerationLoop:
    settings: dict[str, Any] = {
        "max_num_seqs": 8,
        "prefill_step_size": 64,
        "prefill_batch_size": 4,
        "kv_budget_bytes": 1 << 28,
        "enable_prefix_caching": True,
    }
    settings.update(changes)
    return GenerationLoop(loaded.model, loaded.vocab_size, LoopSettings(**settings), "tiny")


def request(request_id: str, prompt: list[int], seed: int | None = None, **params: Any) -> EngineCoreRequest:
    params.setdefault("temperature", 0.0)
    params.setdefault("max_tokens", 8)
    return EngineCoreRequest(request_id, tuple(prompt), SamplingParams(**params), EOS, time.time(), seed=seed)


def run(
    loop: GenerationLoop,
    requests: list[EngineCoreRequest],
    each_step: Callable[[EngineStats], None] | None = None,
) -> dict[str, list[EngineCoreOutput]]:
    for item in requests:
        loop.add_request(item)
    outputs: dict[str, list[EngineCoreOutput]] = {}
    for _ in range(500):
        if not loop.has_work():
            return outputs
        for output in loop.step():
            outputs.setdefault(output.request_id, []).append(output)
        if each_step is not None:
            each_step(loop.stats())
    raise AssertionError("the loop did not finish its requests in 500 steps")


def tokens(outputs: list[EngineCoreOutput]) -> list[int]:
    return [token for output in outputs for token in output.new_token_ids]


@pytest.fixture(scope="module")
def transformers_greedy(tiny_model_dir: Callable[..., Path]) -> list[list[int]]:
    """8 argmax tokens per prompt from transformers, recomputing the whole sequence each step."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    results = []
    with torch.no_grad():
        for prompt in PROMPTS:
            sequence = list(prompt)
            for _ in range(8):
                sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
            results.append(sequence[len(prompt) :])
    return results


@pytest.mark.parametrize("prefill_step_size", [64, 4])
def test_batched_greedy_matches_transformers(
    loaded: LoadedModel, transformers_greedy: list[list[int]], prefill_step_size: int
) -> None:
    loop = make_loop(loaded, prefill_step_size=prefill_step_size, prefill_batch_size=2)
    outputs = run(loop, [request(f"r{i}", p, ignore_eos=True) for i, p in enumerate(PROMPTS)])
    for index, expected in enumerate(transformers_greedy):
        got = outputs[f"r{index}"]
        assert tokens(got) == expected
        assert [o.finish_reason for o in got] == [None] * 7 + [FinishReason.LENGTH]
        assert got[0].scheduled_time is not None and all(o.scheduled_time is None for o in got[1:])


def test_running_set_is_capped_and_requests_join_as_others_leave(loaded: LoadedModel) -> None:
    loop = make_loop(loaded, max_num_seqs=2)
    seen: list[EngineStats] = []
    requests = [request(f"r{i}", p, max_tokens=3 + i, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    outputs = run(loop, requests, seen.append)
    assert max(s.num_running for s in seen) == 2
    assert seen[0].num_waiting == 3
    assert all(s.num_running + s.num_waiting <= 5 for s in seen)
    assert {rid: len(tokens(out)) for rid, out in outputs.items()} == {f"r{i}": 3 + i for i in range(5)}
    assert seen[-1].num_running == 0 and seen[-1].num_waiting == 0


def test_a_large_n_requests_sequences_take_turns_with_later_requests(loaded: LoadedModel) -> None:
    """Admission as the torch scheduler's (core/admission.py): a request's n sequences share one turn,
    which goes to the back of the line each time one of them is admitted. First come, first served
    kept a later request out until every sibling (or every prompt of a /v1/completions batch) ran."""
    loop = make_loop(loaded, max_num_seqs=1)
    siblings = [replace(request(f"g{i}", PROMPTS[1], max_tokens=2), group_id="g") for i in range(3)]
    outputs = run(loop, [*siblings, request("solo", PROMPTS[2], max_tokens=2)])
    assert list(outputs) == ["g0", "solo", "g1", "g2"]  # one at a time: in the order of first outputs


def test_eos_is_masked_until_min_tokens_then_stops(loaded: LoadedModel) -> None:
    outputs = run(make_loop(loaded), [request("r", PROMPTS[0], min_tokens=3, logit_bias={1: 100.0})])["r"]
    assert tokens(outputs)[3] == 1 and len(tokens(outputs)) == 4
    assert 1 not in tokens(outputs)[:3]
    assert outputs[-1].finish_reason is FinishReason.STOP and outputs[-1].stop_token_id is None


def test_stop_token_ids_end_the_sequence_and_are_reported(loaded: LoadedModel) -> None:
    outputs = run(make_loop(loaded), [request("r", PROMPTS[1], stop_token_ids=[77], logit_bias={77: 100.0})])[
        "r"
    ]
    assert tokens(outputs) == [77]
    assert outputs[-1].finish_reason is FinishReason.STOP and outputs[-1].stop_token_id == 77


def test_ignore_eos_runs_to_max_tokens(loaded: LoadedModel) -> None:
    outputs = run(make_loop(loaded), [request("r", PROMPTS[1], ignore_eos=True, logit_bias={1: 100.0})])["r"]
    assert tokens(outputs) == [1] * 8
    assert outputs[-1].finish_reason is FinishReason.LENGTH


def test_abort_ends_running_and_waiting_requests(loaded: LoadedModel) -> None:
    loop = make_loop(loaded, max_num_seqs=1)
    for item in (request("running", PROMPTS[0], max_tokens=50), request("waiting", PROMPTS[1])):
        loop.add_request(item)
    loop.step()
    loop.step()
    aborted = loop.abort_requests(["running", "waiting", "unknown"])
    assert [(o.request_id, o.finish_reason) for o in aborted] == [
        ("running", FinishReason.ABORT),
        ("waiting", FinishReason.ABORT),
    ]
    assert not loop.has_work()
    assert loop.step() == []
    assert tokens(run(loop, [request("after", PROMPTS[2])])["after"])


def test_duplicate_request_ids_are_refused(loaded: LoadedModel) -> None:
    loop = make_loop(loaded)
    loop.add_request(request("same", PROMPTS[0]))
    with pytest.raises(ValueError, match="same"):
        loop.add_request(request("same", PROMPTS[1]))


def test_samplers_and_stop_automata_of_ended_requests_are_not_kept(loaded: LoadedModel) -> None:
    """The client picks the temperature and the stop tokens: a sampler or automaton kept for every
    value ever sent grew without bound. They are shared while a request uses them, then let go."""
    loop = make_loop(loaded, max_num_seqs=2)
    varied = [
        request(f"r{i}", PROMPTS[i % len(PROMPTS)], temperature=0.5 + i / 100, stop_token_ids=[100 + i])
        for i in range(12)
    ]
    run(loop, varied[:6])
    for item in varied[6:9]:
        loop.add_request(item)
    loop.step()
    loop.abort_requests([item.request_id for item in varied[6:9]])
    for i in range(2):  # running together, with equal knobs: one sampler and one automaton
        loop.add_request(request(f"same{i}", PROMPTS[0], temperature=0.7, stop_token_ids=[9], max_tokens=50))
    loop.step()
    assert len(loop._samplers._shared) == 1 and len(loop._stop_automata) == 1
    loop.abort_requests(["same0", "same1"])
    assert not loop.has_work()
    assert len(loop._samplers._shared) == 0
    assert len(loop._stop_automata) == 0


def test_prefix_reuse_reports_cached_tokens_and_keeps_outputs(loaded: LoadedModel) -> None:
    follow_up = PROMPTS[0] + [30, 31, 32]
    warm = make_loop(loaded)
    run(warm, [request("first", PROMPTS[0])])
    reused = run(warm, [request("second", follow_up)])["second"]
    cold = run(make_loop(loaded, enable_prefix_caching=False), [request("second", follow_up)])["second"]
    first_total = len(PROMPTS[0]) + 8
    assert reused[0].num_cached_tokens >= len(PROMPTS[0])
    assert reused[0].num_cached_tokens <= min(first_total, len(follow_up) - 1)
    assert cold[0].num_cached_tokens == 0
    assert tokens(reused) == tokens(cold)
    stats = warm.stats()
    assert stats.prefix_cache_queries == len(PROMPTS[0]) + len(follow_up)
    assert stats.prefix_cache_hits == reused[0].num_cached_tokens


def test_identical_prompt_reuses_all_but_the_last_token(loaded: LoadedModel) -> None:
    loop = make_loop(loaded)
    first = run(loop, [request("a", PROMPTS[3])])["a"]
    again = run(loop, [request("b", PROMPTS[3])])["b"]
    assert again[0].num_cached_tokens == len(PROMPTS[3]) - 1
    assert tokens(again) == tokens(first)


def test_kv_usage_counts_running_sequences_and_not_the_prompt_cache(loaded: LoadedModel) -> None:
    loop = make_loop(loaded)
    seen: list[float] = []
    run(
        loop,
        [request(str(i), prompt) for i, prompt in enumerate(PROMPTS)],
        lambda s: seen.append(s.kv_cache_usage),
    )
    assert seen[0] > 0
    # Idle with finished sequences' KV kept for reuse: evictable, so free (as the torch scheduler says).
    assert loop.prompt_cache.nbytes > 0
    assert loop.stats().kv_cache_usage == 0.0


def test_logprobs_are_ranked_and_come_from_the_raw_distribution(loaded: LoadedModel) -> None:
    plain = run(make_loop(loaded), [request("r", PROMPTS[0], logprobs=3, max_tokens=3)])["r"]
    for output in plain:
        (entry,) = output.new_logprobs
        assert entry.rank == 1 and entry.top[0] == (output.new_token_ids[0], entry.logprob)
        assert len(entry.top) == 3 and entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]
    biased = run(
        make_loop(loaded), [request("r", PROMPTS[0], logprobs=0, max_tokens=1, logit_bias={77: 100.0})]
    )
    (entry,) = biased["r"][0].new_logprobs
    assert biased["r"][0].new_token_ids == (77,)
    assert entry.rank > 1 and entry.logprob < plain[0].new_logprobs[0].logprob and entry.top == ()


def test_a_bfloat16_models_logprobs_and_greedy_tokens_come_from_float32(
    tiny_model_dir: Callable[..., Path],
) -> None:
    """mlx-lm normalises logits in the model's dtype: a bfloat16 model's logprobs landed on a grid of
    1/32, tying alternatives, and greedy took the lowest id among the tokens the grid tied. Scored as a
    prompt (in float32), the generated tokens get the logprobs reported with them, and each is the
    most likely."""
    directory = tiny_model_dir("llama")
    bf16 = load_model(EngineConfig(model=str(directory), dtype="bfloat16"), directory)
    generated = run(make_loop(bf16), [request("g", PROMPTS[0], logprobs=5, max_tokens=3)])["g"]
    new = tokens(generated)
    scored = run(make_loop(bf16), [request("s", PROMPTS[0] + new, prompt_logprobs=5, max_tokens=1)])["s"]
    for output, entry in zip(generated, scored[0].prompt_logprobs[-len(new) :], strict=True):
        (reported,) = output.new_logprobs
        assert entry.rank == 1  # the greedy token is the argmax of the model's distribution
        assert reported.logprob == pytest.approx(entry.logprob, abs=1e-3)
        assert [value for _, value in reported.top] == pytest.approx(
            [value for _, value in entry.top], abs=1e-3
        )


def test_a_scored_prompt_is_scheduled_before_its_scoring_forward(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue-time metric runs from arrival to the first schedule: the forward that scores the
    prompt's logprobs is the request's prefill, not time it waited (it was stamped after it)."""
    import batchlm.backends.mlx.loop as loop_module

    clock = {"now": 1000.0}
    real_score = loop_module.score_prompt

    def slow_score(*args: Any, **kwargs: Any) -> Any:
        clock["now"] += 60.0  # the forward, on a clock of its own
        return real_score(*args, **kwargs)

    monkeypatch.setattr(loop_module, "score_prompt", slow_score)
    monkeypatch.setattr(
        loop_module, "time", SimpleNamespace(time=lambda: clock["now"], monotonic=time.monotonic)
    )
    [first, *_] = run(make_loop(loaded), [request("p", PROMPTS[0], prompt_logprobs=1, max_tokens=2)])["p"]
    assert first.prompt_logprobs and first.scheduled_time == 1000.0


def test_prompt_logprobs_score_each_prompt_token_as_transformers(
    loaded: LoadedModel, tiny_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from batchlm.backends.mlx import loop as mlx_loop

    monkeypatch.setattr(mlx_loop, "PROMPT_SCORE_ROWS", 5)  # the prompt's 12 positions in three forwards
    prompt = PROMPTS[0]
    outputs = run(make_loop(loaded), [request("p", prompt, prompt_logprobs=2, max_tokens=3)])["p"]
    first, *rest = outputs
    assert len(first.prompt_logprobs) == len(prompt) - 1 and all(o.prompt_logprobs == () for o in rest)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    with torch.no_grad():
        raw = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
    for position, entry in enumerate(first.prompt_logprobs):
        row = raw[position]
        assert entry.logprob == pytest.approx(float(row[prompt[position + 1]]), abs=1e-3)
        assert [token for token, _ in entry.top] == row.topk(2).indices.tolist()
    plain = run(make_loop(loaded), [request("p", prompt, max_tokens=3)])["p"]
    assert tokens(plain) == tokens(outputs) and plain[0].prompt_logprobs == ()


def test_a_prefix_scored_before_is_reused_with_its_logprobs(
    loaded: LoadedModel, tiny_model_dir: Callable[..., Path]
) -> None:
    """An eval's choices after one context: the second scores only past the shared tokens, from the
    prompt cache's KV and the kept logprobs, and every entry is transformers'."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    context = PROMPTS[0]
    loop = make_loop(loaded)
    for round_, choice in enumerate(([70, 71, 72], [80, 81], [70, 71, 72])):
        prompt = [*context, *choice]
        [first, *_] = run(loop, [request(f"c{round_}", prompt, prompt_logprobs=2, max_tokens=2)])[
            f"c{round_}"
        ]
        # Round 0 scores it all; round 1 shares the context (13 tokens: 12 entries and their KV); round
        # 2 repeats round 0's prompt (all but the last token).
        assert first.num_cached_tokens == [0, len(context) - 1, len(prompt) - 1][round_]
        with torch.no_grad():
            raw = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
        assert len(first.prompt_logprobs) == len(prompt) - 1
        for position, entry in enumerate(first.prompt_logprobs):
            assert entry.logprob == pytest.approx(float(raw[position][prompt[position + 1]]), abs=1e-3)
            assert [token for token, _ in entry.top] == raw[position].topk(2).indices.tolist()
    more = run(loop, [request("more", [*context, 70, 71, 72], prompt_logprobs=3, max_tokens=1)])["more"]
    assert more[0].num_cached_tokens == 0, "more alternatives than were kept: scored again"


def test_seeded_sampling_ignores_batch_mates(loaded: LoadedModel) -> None:
    seeded = request("s", PROMPTS[1], seed=42, temperature=1.0, max_tokens=12)
    alone = tokens(run(make_loop(loaded), [seeded])["s"])
    mates = [request("a", PROMPTS[0], temperature=0.7, max_tokens=12), request("b", PROMPTS[4], max_tokens=5)]
    crowded = tokens(run(make_loop(loaded), [mates[0], seeded, mates[1]])["s"])
    other_seed = tokens(
        run(make_loop(loaded), [request("s", PROMPTS[1], seed=43, temperature=1.0, max_tokens=12)])["s"]
    )
    assert alone == crowded
    assert alone != other_seed


def test_a_negative_or_huge_seed_is_served_and_fails_no_batch_mate(loaded: LoadedModel) -> None:
    # The API takes any integer seed: one outside mlx's 64-bit key range raised TypeError when the
    # request started, failing every request admitted with it.
    seeds = {"negative": -1, "huge": 2**64 + 5, "plain": None}
    requests = [
        request(name, PROMPTS[1], seed=seed, temperature=1.0, max_tokens=4) for name, seed in seeds.items()
    ]
    outputs = run(make_loop(loaded), requests)
    assert all(outputs[name][-1].finish_reason is FinishReason.LENGTH for name in seeds)
    same = run(
        make_loop(loaded), [request("negative", PROMPTS[1], seed=2**64 - 1, temperature=1.0, max_tokens=4)]
    )
    assert tokens(outputs["negative"]) == tokens(same["negative"])  # as the PyTorch engine: modulo 2**64


def test_a_failed_step_fails_the_running_requests_and_the_loop_recovers(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = make_loop(loaded)
    loop.add_request(request("doomed", PROMPTS[0]))
    loop.step()
    monkeypatch.setattr(loop._generator, "next", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        loop.step()
    (failed,) = loop.fail_running("the step failed: boom")
    assert failed.finish_reason is FinishReason.ERROR and failed.error == "the step failed: boom"
    assert not loop.has_work()
    assert len(tokens(run(loop, [request("next", PROMPTS[1])])["next"])) == 8


def test_requests_the_generator_refuses_fail_alone(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = make_loop(loaded)

    def refuse(*args: Any, **kwargs: Any) -> list[int]:
        raise ValueError("no room")

    monkeypatch.setattr(loop._generator, "insert_segments", refuse)
    loop.add_request(request("refused", PROMPTS[0]))
    (failed,) = loop.step()
    assert failed.request_id == "refused" and failed.finish_reason is FinishReason.ERROR
    assert failed.error is not None and "no room" in failed.error
    assert not loop.has_work()
    monkeypatch.undo()
    assert len(tokens(run(loop, [request("next", PROMPTS[1])])["next"])) == 8
