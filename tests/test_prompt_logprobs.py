"""A prompt's log-probabilities (SamplingParams.prompt_logprobs): each prompt token after the first, as
transformers scores it given the tokens before, however the prompt is scheduled (whole, in chunks,
batched, after its prefix was cached, preempted), and only once per request."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm import LLM, SamplingParams
from batchlm.core.facts import ModelFacts
from batchlm.engine.client import RequestRejectedError
from batchlm.engine.input_processor import FieldNames, InputProcessor
from batchlm.outputs import RequestOutput, TokenLogprobs
from batchlm.runner import prompt_logprobs
from batchlm.sampling_params import StructuredOutputs

TOP = 3
ASK = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=TOP)


def _prompts(vocab: int = 300) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(10, vocab, (n,), generator=generator).tolist() for n in (37, 9, 1, 50)]


def _llm(model_dir: Path, **kwargs: Any) -> LLM:
    return LLM(model=str(model_dir), device="cpu", **kwargs)


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def expected(llama_dir: Path) -> list[list[TokenLogprobs | None]]:
    """transformers' log-softmax over each prompt's logits, read at the next prompt token."""
    return [_transformers_logprobs(llama_dir, prompt) for prompt in _prompts()]


@functools.cache
def _transformers_model(model_dir: Path) -> Any:
    """Loaded once per directory: every reference in this file scores with the same model."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _transformers_logprobs(model_dir: Path, prompt: list[int]) -> list[TokenLogprobs | None]:
    hf = _transformers_model(model_dir)
    with torch.no_grad():
        raw = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    entries: list[TokenLogprobs | None] = [None]
    for position in range(1, len(prompt)):
        row, token = raw[position - 1], prompt[position]
        top_values, top_ids = row.topk(TOP)
        rank = int((row > row[token]).sum()) + 1
        entries.append(
            TokenLogprobs(
                float(row[token]), rank, tuple(zip(top_ids.tolist(), top_values.tolist(), strict=True))
            )
        )
    return entries


def assert_close(got: list[TokenLogprobs | None] | None, want: list[TokenLogprobs | None]) -> None:
    assert got is not None and len(got) == len(want)
    for entry, reference in zip(got, want, strict=True):
        if reference is None:
            assert entry is None
            continue
        assert entry is not None
        assert math.isclose(entry.logprob, reference.logprob, abs_tol=1e-4)
        assert entry.rank == reference.rank
        assert [token for token, _ in entry.top] == [token for token, _ in reference.top]
        assert all(
            math.isclose(a, b, abs_tol=1e-4) for (_, a), (_, b) in zip(entry.top, reference.top, strict=True)
        )


def _prompt_logprobs(outputs: list[RequestOutput]) -> list[list[TokenLogprobs | None] | None]:
    return [output.prompt_logprobs for output in outputs]


def test_every_prompt_token_is_scored_as_transformers_scores_it(
    llama_dir: Path, expected: list[list[TokenLogprobs | None]]
) -> None:
    outputs = _llm(llama_dir).generate(_prompts(), ASK)
    for got, want in zip(_prompt_logprobs(outputs), expected, strict=True):
        assert_close(got, want)
    # The generated tokens are those of a request that asks nothing.
    plain = _llm(llama_dir).generate(_prompts(), ASK.clone(prompt_logprobs=None))
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in plain]
    assert _prompt_logprobs(plain) == [None] * len(plain)


def test_rows_read_a_few_at_a_time_give_the_same(
    llama_dir: Path, expected: list[list[TokenLogprobs | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prompt_logprobs, "PROMPT_LOGPROB_ROWS", 4)
    for got, want in zip(_prompt_logprobs(_llm(llama_dir).generate(_prompts(), ASK)), expected, strict=True):
        assert_close(got, want)


def test_chunked_batched_and_mixed_prompts_give_the_same(
    llama_dir: Path, expected: list[list[TokenLogprobs | None]]
) -> None:
    # Chunks of 8 tokens split every long prompt; only some requests ask.
    llm = _llm(llama_dir, max_num_batched_tokens=8, max_num_seqs=4)
    params = [ASK, ASK.clone(prompt_logprobs=None), ASK, ASK.clone(prompt_logprobs=0)]
    outputs = llm.generate(_prompts(), params)
    assert_close(outputs[0].prompt_logprobs, expected[0])
    assert outputs[1].prompt_logprobs is None
    assert_close(outputs[2].prompt_logprobs, expected[2])
    zero_top = outputs[3].prompt_logprobs
    assert zero_top is not None and all(entry is None or entry.top == () for entry in zero_top)
    assert [entry and entry.logprob for entry in zero_top] == pytest.approx(
        [entry and entry.logprob for entry in expected[3]], abs=1e-4
    )


def test_a_prefix_cached_without_its_logprobs_is_computed_again(
    llama_dir: Path, expected: list[list[TokenLogprobs | None]]
) -> None:
    llm = _llm(llama_dir, block_size=4)
    prompt = _prompts()[3]
    llm.generate([prompt], ASK.clone(prompt_logprobs=None))  # its blocks are now cached, not their logprobs
    [again] = llm.generate([prompt], ASK)
    assert again.num_cached_tokens == 0
    assert_close(again.prompt_logprobs, expected[3])
    [cached] = llm.generate([prompt], ASK.clone(prompt_logprobs=None))
    assert cached.num_cached_tokens > 0, "a request that asks nothing still takes the cache"


def test_a_prefix_scored_before_is_served_from_the_cache_with_its_logprobs(
    llama_dir: Path, expected: list[list[TokenLogprobs | None]]
) -> None:
    """Choices scored after a shared context (an eval's multiple choice): the context's blocks and their
    logprobs come from the cache, the rest is computed, and every entry is transformers'."""
    llm = _llm(llama_dir, block_size=4)
    prompt = _prompts()[3]  # 50 tokens: 12 blocks of 4 may be hits
    [first] = llm.generate([prompt], ASK)
    assert first.num_cached_tokens == 0
    assert_close(first.prompt_logprobs, expected[3])
    [again] = llm.generate([prompt], ASK)
    assert again.num_cached_tokens == 48
    assert_close(again.prompt_logprobs, expected[3])
    # Fewer alternatives are served from entries that list more; the first choice of the context
    # differs after 30 tokens: 7 blocks are hits (the 8th block's last row predicts the changed token).
    [fewer] = llm.generate([prompt], ASK.clone(prompt_logprobs=1))
    assert fewer.num_cached_tokens == 48 and fewer.prompt_logprobs is not None
    assert [e and (e.logprob, e.rank, e.top) for e in fewer.prompt_logprobs] == [
        e and (e.logprob, e.rank, e.top[:1]) for e in again.prompt_logprobs or []
    ]
    other = [*prompt[:30], *[(token + 1) % 300 for token in prompt[30:]]]
    want = _transformers_logprobs(llama_dir, other)
    [choice] = llm.generate([other], ASK)
    assert choice.num_cached_tokens == 28
    assert_close(choice.prompt_logprobs, want)
    # More alternatives than were kept: computed again.
    [more] = llm.generate([prompt], ASK.clone(prompt_logprobs=TOP + 1))
    assert more.num_cached_tokens == 0


def test_choices_sent_together_wait_for_their_context_and_take_it_from_the_cache(llama_dir: Path) -> None:
    """An eval's choices arrive together: the first computes the shared context, the others wait for its
    blocks (and their logprobs) instead of computing the context again."""
    context = _prompts()[3][:40]
    choices = [[*context, 11 + i, 12 + i, 13 + i] for i in range(4)]
    llm = _llm(llama_dir, block_size=4)
    outputs = llm.generate(choices, ASK)
    # 10 blocks of context; the 10th block's last row predicts the choice's first token, which differs.
    assert [output.num_cached_tokens for output in outputs] == [0, 36, 36, 36]
    for output, prompt in zip(outputs, choices, strict=True):
        assert_close(output.prompt_logprobs, _transformers_logprobs(llama_dir, prompt))


def test_speculative_steps_leave_the_prompt_s_logprobs_alone(
    llama_dir: Path, expected: list[list[TokenLogprobs | None]]
) -> None:
    # Drafts from the prompt's own n-grams verified every step; the prompt, scored twice, from the
    # cache the second time.
    llm = _llm(llama_dir, block_size=4, speculative="ngram")
    prompt = [*_prompts()[3][:20], *_prompts()[3][:20]]  # repeats itself: drafts are found
    want = _transformers_logprobs(llama_dir, prompt)
    for _ in range(2):
        [output] = llm.generate([prompt], ASK.clone(max_tokens=12))
        assert_close(output.prompt_logprobs, want)
    assert output.num_cached_tokens == 36
    assert llm.engine_core.stats().spec_proposed_tokens_total > 0
    plain = _llm(llama_dir, speculative="off").generate([prompt], ASK.clone(max_tokens=12))
    assert output.outputs[0].token_ids == plain[0].outputs[0].token_ids


def test_a_prompt_whose_last_token_comes_with_drafts_reports_its_logprobs(llama_dir: Path) -> None:
    # Chunks of 13 tokens leave the 40-token prompt's last token alone in a step: the prompt repeats
    # itself, so that token goes with drafts (a verify chunk), which samples the first token.
    prompt = [*_prompts()[3][:20], *_prompts()[3][:20]]
    want = _transformers_logprobs(llama_dir, prompt)
    for caching in (False, True):
        llm = _llm(
            llama_dir,
            speculative="ngram",
            max_num_batched_tokens=13,
            enable_prefix_caching=caching,
        )
        [output] = llm.generate([prompt], ASK.clone(max_tokens=8))
        assert llm.engine_core.stats().spec_proposed_tokens_total > 0
        assert_close(output.prompt_logprobs, want)


def test_kept_logprobs_are_bounded_and_the_oldest_go_first(
    llama_dir: Path, expected: list[list[TokenLogprobs | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchlm.core import prompt_logprob_cache

    # Room for 12 blocks of 4 entries.
    monkeypatch.setattr(
        prompt_logprob_cache, "PROMPT_LOGPROB_CACHE_BYTES", 48 * prompt_logprob_cache.entry_bytes(TOP)
    )
    llm = _llm(llama_dir, block_size=4)
    long, short = _prompts()[3], _prompts()[0]  # 12 and 9 blocks kept of 12 allowed
    llm.generate([long], ASK)
    llm.generate([short], ASK)
    assert len(llm.engine_core.scheduler.prompt_logprobs) == 12
    [long_again] = llm.generate([long], ASK)
    assert long_again.num_cached_tokens == 0, "its first blocks' logprobs went first"
    assert_close(long_again.prompt_logprobs, expected[3])


def test_n_sequences_and_preemption_report_the_prompt_once(
    llama_dir: Path, expected: list[list[TokenLogprobs | None]]
) -> None:
    # 20 blocks of 4 tokens hold one long request but not all of them: some are preempted and recomputed,
    # in 8-token chunks, the longest prompt several times before its first token (and its logprobs).
    llm = _llm(
        llama_dir,
        block_size=4,
        num_gpu_blocks_override=20,
        enable_prefix_caching=False,
        max_num_batched_tokens=8,
    )
    outputs = llm.generate(_prompts(), ASK.clone(max_tokens=24, n=2, temperature=1.0, seed=1))
    assert llm.engine_core.stats().num_preemptions > 0
    for got, want in zip(_prompt_logprobs(outputs), expected, strict=True):
        assert_close(got, want)


def test_a_constrained_request_scores_its_prompt_too(
    llama_dir: Path, expected: list[list[TokenLogprobs | None]]
) -> None:
    # Its sampling waits for its grammar's mask; the prompt's logprobs travel with that step's output.
    choice = StructuredOutputs(choice=("yes", "no"))
    [output] = _llm(llama_dir).generate([_prompts()[0]], ASK.clone(structured_outputs=choice, max_tokens=8))
    assert output.outputs[0].text in ("yes", "no")
    assert_close(output.prompt_logprobs, expected[0])


def test_an_engine_that_does_not_compute_them_refuses_naming_the_field() -> None:
    processor = InputProcessor(ModelFacts(max_model_len=64, vocab_size=100))
    with pytest.raises(RequestRejectedError) as refused:
        processor.process([1, 2, 3], ASK, names=FieldNames(prompt_logprobs="echo"))
    assert refused.value.param == "echo" and "prompt log-probabilities" in str(refused.value).lower()
    computed = InputProcessor(ModelFacts(max_model_len=64, vocab_size=100, computes_prompt_logprobs=True))
    assert computed.process([1, 2, 3], ASK).params.prompt_logprobs == TOP


def test_the_count_asked_is_bounded() -> None:
    from batchlm.sampling_params import SamplingParamsError

    with pytest.raises(SamplingParamsError) as bad:
        SamplingParams(prompt_logprobs=21)
    assert bad.value.param == "prompt_logprobs"
