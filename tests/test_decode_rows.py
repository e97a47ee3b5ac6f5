"""Verify steps laid out as decode rows (runner/decode_rows.py), the layout that lets them replay the
decode CUDA graphs: the same inputs, slots and sampled rows as the chunked layout, the same logits and
greedy tokens from the model (tiny Llama, float32, torch backend), and the same engine output."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from batchlm import LLM, SamplingParams
from batchlm.attention import torch_backend
from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.core.step_io import ScheduledChunk, SchedulerOutput
from batchlm.kernels.cpu_decode_attention import decode_library
from batchlm.models.loader import LoadedModel, load_model
from batchlm.runner.decode_rows import all_decode_or_verify, as_decode_rows
from batchlm.runner.inputs import StepInputBuilder, StepInputs
from batchlm.runner.model_runner import ModelRunner
from models_harness import make_kv_caches

BLOCK = 4
CPU = torch.device("cpu")
LOOPING = [5, 6, 7, 8, 9] * 6


def _step(*chunks: ScheduledChunk) -> SchedulerOutput:
    return SchedulerOutput(tuple(chunks), (), frozenset())


def _build(scheduled: SchedulerOutput, max_decode_rows: int) -> StepInputs:
    builder = StepInputBuilder(BLOCK, CPU)
    builder.max_decode_rows = max_decode_rows
    return builder.build(scheduled)


# A decode (request "a", 9 tokens cached) and a verify chunk (request "b": its last token and 3 drafts
# after 6 cached tokens), each chunk carrying its whole block table.
DECODE = ScheduledChunk("a", (40,), 9, (3, 0, 5), True)
VERIFY = ScheduledChunk("b", (41, 42, 43, 44), 6, (1, 4, 2), True, 3)


def test_which_steps_are_laid_out_as_decode_rows() -> None:
    prompt_tail = ScheduledChunk("c", (1, 2, 3), 8, (6, 7, 8), False)
    sampling_prompt = ScheduledChunk("c", (1, 2, 3), 8, (6, 7, 8), True)
    assert all_decode_or_verify([DECODE, VERIFY])
    assert all_decode_or_verify([VERIFY])
    assert not all_decode_or_verify([DECODE])  # nothing to verify: the plain decode path already
    assert not all_decode_or_verify([DECODE, VERIFY, prompt_tail])
    assert not all_decode_or_verify([VERIFY, sampling_prompt])
    assert not all_decode_or_verify([VERIFY, ScheduledChunk("d", (9,), 0, (9,), False)])


def test_rows_carry_their_position_context_and_table() -> None:
    positions = np.array([9, 6, 7, 8, 9], dtype=np.int64)
    request_of_token = np.array([0, 1, 1, 1, 1])
    tables = np.array([[3, 0, 5], [1, 4, 2]], dtype=np.int32)
    layout = as_decode_rows(positions, request_of_token, tables)
    assert layout.query_start_loc.tolist() == [0, 1, 2, 3, 4, 5]
    assert layout.seq_lens.tolist() == [10, 7, 8, 9, 10]
    assert layout.block_tables.tolist() == [[3, 0, 5]] + [[1, 4, 2]] * 4


def test_decode_rows_keep_tokens_slots_and_sampled_rows() -> None:
    chunked, rows = _build(_step(DECODE, VERIFY), 0), _build(_step(DECODE, VERIFY), 8)
    for name in ("input_ids", "positions", "sample_indices"):
        assert torch.equal(getattr(chunked, name), getattr(rows, name)), name
    assert torch.equal(chunked.meta.slot_mapping, rows.meta.slot_mapping)
    assert chunked.sample_request_ids == rows.sample_request_ids == ["a", "b", "b", "b", "b"]
    assert (chunked.meta.num_decodes, chunked.meta.num_requests, chunked.meta.max_query_len) == (1, 2, 4)
    assert (rows.meta.num_decodes, rows.meta.num_requests, rows.meta.max_query_len) == (5, 5, 1)
    assert rows.meta.seq_lens_cpu == [10, 7, 8, 9, 10]
    assert rows.meta.query_start_loc_cpu == [0, 1, 2, 3, 4, 5]
    assert rows.meta.block_tables.tolist() == [[3, 0, 5]] + [[1, 4, 2]] * 4
    assert rows.meta.max_seq_len == 10


def test_steps_past_the_row_limit_or_with_prompts_stay_chunked() -> None:
    assert _build(_step(DECODE, VERIFY), 4).meta.num_decodes == 1  # 5 rows > 4
    prompt = ScheduledChunk("c", (1, 2, 3), 0, (6,), True)
    assert _build(_step(DECODE, VERIFY, prompt), 64).meta.num_decodes == 1


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Callable[..., Path]) -> LoadedModel:
    return load_model(
        tiny_model_dir("llama"), torch.float32, CPU, random_weights=True, seed=3, progress=False
    )


@pytest.fixture(params=["c-kernel", "torch-ops"])
def attention_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The torch backend's decode rows through our C kernel, or through its torch ops (padded SDPA)
    while the chunk takes the masked prefill SDPA."""
    if request.param == "c-kernel" and decode_library() is None:
        pytest.skip("no AVX2 CPU or C compiler here")
    if request.param == "torch-ops":
        monkeypatch.setattr(torch_backend.cpu_decode_attention, "supports", lambda query, cache: False)
    yield request.param


@torch.inference_mode()
def _logits(loaded: LoadedModel, caches: list[torch.Tensor], inputs: StepInputs) -> torch.Tensor:
    hidden = loaded.model(inputs.input_ids, inputs.positions, caches, inputs.meta, TorchAttentionBackend())
    return loaded.model.compute_logits(hidden[inputs.sample_indices])


def test_decode_rows_give_the_logits_of_the_chunk(loaded: LoadedModel, attention_path: str) -> None:
    """Two prompts prefilled, then one step with a decode and a verify chunk of 1 + 5 tokens that
    crosses a block boundary: the decode-row layout gives the chunked layout's logits and tokens."""
    caches = make_kv_caches(loaded, 16, BLOCK)
    prompt_a, prompt_b = list(range(20, 31)), list(range(50, 57))
    prefill = _step(
        ScheduledChunk("a", tuple(prompt_a), 0, (3, 0, 5, 9), True),
        ScheduledChunk("b", tuple(prompt_b), 0, (1, 4, 2, 11), True),
    )
    _logits(loaded, caches, _build(prefill, 0))
    verify = _step(
        ScheduledChunk("a", (60,), len(prompt_a), (), True),
        ScheduledChunk("b", (61, 62, 63, 64, 65, 66), len(prompt_b), (), True, 5),
    )
    results = {}
    for limit in (0, 16):
        builder = StepInputBuilder(BLOCK, CPU)
        builder.max_decode_rows = limit
        builder.build(prefill)  # the tables, as the runner holds them after the prompts
        inputs = builder.build(verify)
        assert inputs.meta.num_decodes == (7 if limit else 1)
        results[limit] = _logits(loaded, [c.clone() for c in caches], inputs)
    chunked, rows = results[0], results[16]
    assert chunked.shape == rows.shape == (7, loaded.shape.vocab_size)
    if attention_path == "c-kernel":
        assert torch.equal(chunked, rows)  # the chunk attends row by row through the same kernel
    torch.testing.assert_close(rows, chunked, atol=1e-5, rtol=1e-5)
    assert torch.equal(rows.argmax(dim=-1), chunked.argmax(dim=-1))


def _runner(llm: LLM) -> ModelRunner:
    runner = llm.engine_core.executor
    assert isinstance(runner, ModelRunner)
    return runner


def test_engine_gives_the_same_tokens_with_verify_steps_as_decode_rows(
    tiny_model_dir: Callable[..., Path],
) -> None:
    model_dir = tiny_model_dir("llama")
    prompts = [LOOPING, list(range(40, 80)), [(7 * i + 3) % 300 for i in range(20)] * 3]
    params = [
        SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=0.8, seed=3, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True),
    ]
    plain = LLM(model=str(model_dir), device="cpu", speculative="off")
    spec = LLM(model=str(model_dir), device="cpu", speculative="ngram")
    runner = _runner(spec)
    runner.input_builder.max_decode_rows = 64
    layouts: list[tuple[bool, bool]] = []  # (has drafts, one decode row per token) of each forward
    forward = runner._forward

    def spy(inputs: StepInputs) -> torch.Tensor:
        layouts.append((inputs.has_drafts, inputs.meta.num_decodes == inputs.meta.num_tokens))
        return forward(inputs)

    runner._forward = spy  # type: ignore[method-assign]
    expected = [[c.token_ids for c in o.outputs] for o in plain.generate(prompts, params)]
    outputs = spec.generate(prompts, params)
    assert [[c.token_ids for c in o.outputs] for o in outputs] == expected
    for got, want in zip(outputs, plain.generate(prompts, params), strict=True):
        for entry, entry2 in zip(got.outputs[0].logprobs or [], want.outputs[0].logprobs or [], strict=True):
            assert entry.logprob == pytest.approx(entry2.logprob, abs=1e-4)
    as_rows = [rows for has_drafts, rows in layouts if has_drafts]
    assert as_rows and all(as_rows)  # every verify step (no prompt in it) ran as decode rows
    assert spec.engine_core.scheduler.stats().spec_accepted_tokens_total > 0
