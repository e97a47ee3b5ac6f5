"""Async scheduling on CUDA (placeholders filled on the device, CUDA-graph decode, pinned token copies):
the same tokens as synchronous scheduling, and no KV block held at the end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from devices import require_cuda
from engine_runs import generated_tokens, sync_and_async_engines

from batchlm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

require_cuda()


def _prompts(count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(10, 300, (5 + 7 * i % 40,), generator=generator).tolist() for i in range(count)]


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Callable[..., Path]) -> dict[str, LLM]:
    return sync_and_async_engines(tiny_model_dir("llama"))


def test_lockstep_batch_same_tokens(engines: dict[str, LLM]) -> None:
    # Same length outputs, no stops: both modes run identical batches, so the tokens must match exactly.
    prompts = _prompts(24)
    params = [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3, logprobs=2),
    ] * 8
    assert engines["on"].engine_core.async_scheduling and not engines["off"].engine_core.async_scheduling
    assert generated_tokens(engines["on"], prompts, params) == generated_tokens(
        engines["off"], prompts, params
    )


def test_mixed_batch_with_stops_same_tokens(engines: dict[str, LLM]) -> None:
    prompts = _prompts(12)
    params = [SamplingParams(temperature=0.0, max_tokens=3 + 2 * i, ignore_eos=True) for i in range(12)]
    # A token the longest request really produces early: with it as a stop, that request ends mid-batch.
    stop = generated_tokens(engines["off"], prompts, params)[11][0][0][4]
    params = [SamplingParams(temperature=0.0, max_tokens=3 + 2 * i, stop_token_ids=[stop]) for i in range(12)]
    off = generated_tokens(engines["off"], prompts, params)
    assert generated_tokens(engines["on"], prompts, params) == off
    assert off[11][0][1] == "stop" and len(off[11][0][0]) <= 5


def test_uploader_round_trips_arrays_through_reused_buffers() -> None:
    import numpy as np

    from batchlm.runner.upload import StepUploader

    uploader = StepUploader(torch.device("cuda"))
    rng = np.random.default_rng(0)
    results = []
    for size in (3, 50, 7, 40_000, 5):  # growth past the first buffer, then small again
        arrays = [
            rng.integers(-(2**40), 2**40, size=size, dtype=np.int64),
            rng.integers(-(2**30), 2**30, size=(size, 3), dtype=np.int32),
            np.zeros(0, dtype=np.int64),
        ]
        tensors = uploader.upload(arrays)
        results.append((arrays, [t.clone() for t in tensors]))  # the buffers are reused later
    for arrays, tensors in results:
        for array, tensor in zip(arrays, tensors, strict=True):
            assert tensor.device.type == "cuda" and tensor.shape == array.shape
            assert tensor.dtype == (torch.int64 if array.dtype == np.int64 else torch.int32)
            assert np.array_equal(tensor.cpu().numpy(), array)
