"""Speculative decoding through the whole CPU engine on a tiny random Llama: the same tokens (greedy,
seeded sampling, logprobs, stop strings, n > 1, structured outputs, preemption, chunked prefill,
prefix hits, async scheduling) with `speculative="ngram"` as with it off, and proposals accepted."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from batchlm import LLM, SamplingParams
from batchlm.sampling_params import StructuredOutputs

# Random tiny models fall into cycles under greedy decoding; this prompt's output is copied a lot.
LOOPING = [5, 6, 7, 8, 9] * 6


def _prompts() -> list[list[int]]:
    return [LOOPING, [(7 * i + 3) % 300 for i in range(20)] * 3, list(range(40, 80)), [11, 12, 13]]


def _llm(model_dir: Path, speculative: str, **kwargs: Any) -> LLM:
    return LLM(model=str(model_dir), device="cpu", speculative=speculative, **kwargs)


def _run(llm: LLM, prompts: Sequence[Any], params: Sequence[SamplingParams]) -> list[Any]:
    outputs = llm.generate(list(prompts), list(params))
    scheduler = llm.engine_core.scheduler
    assert scheduler.num_free_blocks == scheduler.num_total_blocks
    return [[(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in o.outputs] for o in outputs]


def _same_tokens(plain: list[Any], spec: list[Any]) -> None:
    """Equal token ids, texts and finish reasons; logprobs equal up to float rounding (a verify chunk
    scores positions through the prefill attention path, plain decoding through the decode path)."""
    assert len(plain) == len(spec)
    for plain_request, spec_request in zip(plain, spec, strict=True):
        for (tokens, text, finish, logprobs), (tokens2, text2, finish2, logprobs2) in zip(
            plain_request, spec_request, strict=True
        ):
            assert (tokens, text, finish) == (tokens2, text2, finish2)
            assert (logprobs is None) == (logprobs2 is None)
            for entry, entry2 in zip(logprobs or [], logprobs2 or [], strict=True):
                assert entry.rank == entry2.rank
                assert entry.logprob == pytest.approx(entry2.logprob, abs=1e-4)
                assert [t for t, _ in entry.top] == [t for t, _ in entry2.top]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


def test_greedy_is_identical_and_drafts_are_accepted(model_dir: Path) -> None:
    params = [SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)] * 4
    plain = _run(_llm(model_dir, "off"), _prompts(), params)
    llm = _llm(model_dir, "ngram")
    spec = _run(llm, _prompts(), params)
    _same_tokens(plain, spec)
    stats = llm.engine_core.scheduler.stats()
    assert stats.spec_accepted_tokens_total >= 40
    assert stats.spec_proposed_tokens_total > stats.spec_accepted_tokens_total
    # Each draft holds one or more of the proposed tokens, and 4 requests verify at most 4 a step.
    assert 0 < stats.spec_drafts_total <= stats.spec_proposed_tokens_total
    assert stats.spec_drafts_total <= 4 * llm.engine_core.num_steps


def test_one_request_takes_fewer_steps(model_dir: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
    plain, spec = _llm(model_dir, "off"), _llm(model_dir, "ngram")
    assert _run(plain, [LOOPING], [params]) == _run(spec, [LOOPING], [params])
    accepted = spec.engine_core.scheduler.stats().spec_accepted_tokens_total
    assert accepted > 0
    # Each accepted draft is a token that needed no step of its own.
    assert spec.engine_core.num_steps == plain.engine_core.num_steps - accepted


def test_seeded_sampling_gives_the_tokens_of_plain_sampling(model_dir: Path) -> None:
    """Each position draws from the request's generator seeded for that position, and a draft is
    accepted only when it equals that draw: the very tokens of plain seeded sampling."""
    params = [
        SamplingParams(temperature=0.7, seed=3, max_tokens=80, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, top_k=5, top_p=0.9, seed=4, max_tokens=80, ignore_eos=True, n=2),
        SamplingParams(temperature=0.5, min_p=0.1, seed=5, max_tokens=60, min_tokens=10),
        SamplingParams(temperature=0.0, max_tokens=60, logprobs=1, logit_bias={7: 2.0}),
    ]
    plain = _run(_llm(model_dir, "off"), _prompts(), params)
    llm = _llm(model_dir, "ngram")
    spec = _run(llm, _prompts(), params)
    _same_tokens(plain, spec)
    _same_tokens(spec, _run(llm, _prompts(), params))  # reproducible (now with prefix-cache hits)
    assert llm.engine_core.scheduler.stats().spec_accepted_tokens_total > 0


def test_stop_strings_end_inside_accepted_drafts(model_dir: Path) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    [[(_, text, _, _)]] = _run(_llm(model_dir, "off"), [LOOPING], [greedy])
    # A stop string that first occurs late in the text, after several drafts were accepted.
    stop = next(text[i : i + 3] for i in range(len(text) // 2, len(text)) if text.find(text[i : i + 3]) == i)
    params = [SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True, stop=[stop])]
    plain = _run(_llm(model_dir, "off"), [LOOPING], params)
    llm = _llm(model_dir, "ngram")
    _same_tokens(plain, _run(llm, [LOOPING], params))
    assert plain[0][0][2] == "stop"
    assert llm.engine_core.scheduler.stats().spec_accepted_tokens_total > 0


def test_stop_tokens_and_max_tokens_end_inside_accepted_drafts(model_dir: Path) -> None:
    """A stop token id, or max_tokens, reached among accepted drafts ends the request there, with the
    tokens, logprobs and finish reason of plain decoding. The engine has already generated this text
    once, so the n-gram pool drafts all of it: each step accepts several tokens, and the stop and the
    limit fall inside those runs."""
    greedy = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    [[(tokens, _, _, _)]] = _run(_llm(model_dir, "off"), [LOOPING], [greedy])
    first: dict[int, int] = {}
    for index, token in enumerate(tokens):
        first.setdefault(token, index)
    stop_token = max(first, key=first.__getitem__)  # the token that first occurs latest
    end = first[stop_token]
    assert end > 40
    params = [
        SamplingParams(
            temperature=0.0, max_tokens=100, ignore_eos=True, stop_token_ids=[stop_token], logprobs=1
        ),
        SamplingParams(temperature=0.0, max_tokens=end - 3, ignore_eos=True, logprobs=1),
    ]
    plain = _run(_llm(model_dir, "off"), [LOOPING, LOOPING], params)
    llm = _llm(model_dir, "ngram")
    _run(llm, [LOOPING], [greedy])
    steps = llm.engine_core.num_steps
    spec = _run(llm, [LOOPING, LOOPING], params)
    _same_tokens(plain, spec)
    [[(stopped, _, stop_reason, stop_logprobs)], [(cut, _, cut_reason, cut_logprobs)]] = spec
    assert (len(stopped), stopped[-1], stop_reason) == (end + 1, stop_token, "stop")
    assert (len(cut), cut_reason) == (end - 3, "length")
    assert len(stop_logprobs) == len(stopped) and len(cut_logprobs) == len(cut)
    assert llm.engine_core.num_steps - steps < end // 2


def test_structured_outputs_and_penalties_do_not_speculate(model_dir: Path) -> None:
    schema = StructuredOutputs(json=json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=schema),
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, repetition_penalty=1.3),
    ]
    prompts = [LOOPING, LOOPING]
    plain = _run(_llm(model_dir, "off"), prompts, params)
    llm = _llm(model_dir, "ngram")
    _same_tokens(plain, _run(llm, prompts, params))
    assert llm.engine_core.scheduler.stats().spec_proposed_tokens_total == 0


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_preemption_chunked_prefill_prefix_hits(model_dir: Path, async_scheduling: str) -> None:
    # 24 blocks of 16 tokens for four requests of up to 160 tokens: preemptions; a 32-token budget:
    # prompts in chunks; the same prompt twice: prefix hits.
    limits = {
        "num_gpu_blocks_override": 24,
        "max_num_batched_tokens": 32,
        "async_scheduling": async_scheduling,
    }
    prompts = [LOOPING * 2, LOOPING * 2, _prompts()[1], _prompts()[2]]
    params = [SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)] * 3
    params.append(SamplingParams(temperature=0.8, seed=9, max_tokens=100, ignore_eos=True))
    plain = _run(_llm(model_dir, "off", **limits), prompts, params)
    llm = _llm(model_dir, "ngram", **limits)
    _same_tokens(plain, _run(llm, prompts, params))
    stats = llm.engine_core.scheduler.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.spec_accepted_tokens_total > 0


def test_int8_quantized_model_gives_the_same_tokens(model_dir: Path) -> None:
    """The quantized matmuls (activations rounded to 8 bits) give the same tokens too. (The tiny model
    does not amplify last-bit differences as the default model does: test_verify_attention.py pins the
    bit-for-bit equality of verify rows and decodes that this relies on.)"""
    params = [SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True, logprobs=1)] * 2
    prompts = [LOOPING, _prompts()[1]]
    plain = _run(_llm(model_dir, "off", quantization="int8"), prompts, params)
    llm = _llm(model_dir, "ngram", quantization="int8")
    spec = _run(llm, prompts, params)
    _same_tokens(plain, spec)
    assert llm.engine_core.scheduler.stats().spec_accepted_tokens_total > 0


def test_concurrent_verify_steps_on_the_fused_cpu_path_are_bit_exact(tmp_path: Path) -> None:
    """On a quantized GGUF model the CPU decodes through the fused stack. Several requests verifying
    drafts in one step (auto's largest step: 4 requests of 1 + 7 rows) must take that stack too: the
    generic forward rounds differently, so the logprobs (and near-tie tokens) would drift from plain
    decoding's."""
    from batchlm.kernels.cpu_decode_stack import stack_library
    from gguf_builder import write_tiny_gguf

    if stack_library() is None:
        pytest.skip("no AVX2 CPU or C compiler here")
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "Q4_1", False)
    prompts = [LOOPING, LOOPING[1:], LOOPING[2:], LOOPING[3:]]
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)] * 4
    limits = {"num_speculative_tokens": 7, "speculative_max_batch": 4}
    plain = _run(LLM(model=str(gguf), device="cpu", speculative="off", **limits), prompts, params)
    llm = LLM(model=str(gguf), device="cpu", speculative="auto", **limits)
    spec = _run(llm, prompts, params)
    assert llm.engine_core.scheduler.stats().spec_accepted_tokens_total > 0
    for plain_request, spec_request in zip(plain, spec, strict=True):
        (tokens, text, finish, logprobs), (tokens2, text2, finish2, logprobs2) = (
            plain_request[0],
            spec_request[0],
        )
        assert (tokens, text, finish) == (tokens2, text2, finish2)
        assert [(e.logprob, e.rank, e.top) for e in logprobs] == [
            (e.logprob, e.rank, e.top) for e in logprobs2
        ]
