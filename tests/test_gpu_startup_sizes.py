"""What a GPU start-up sizes from its flags, checked on the CPU: the decode batches captured as CUDA
graphs stop at MAX_CAPTURE_BATCH whatever --max-num-seqs says, and the profile run that sizes the KV
cache computes and samples the largest step the scheduler can send, a budget above the context
included. The same start-ups on a GPU: tests/gpu/test_startup_extremes_gpu.py."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm.config import EngineConfig
from batchlm.runner.cuda_graph import (
    MAX_CAPTURE_BATCH,
    MAX_VERIFY_GRAPH_ROWS,
    capture_sizes,
    graph_batch_limit,
)
from batchlm.runner.gpu_startup import (
    LargestStep,
    hidden_states_bytes,
    largest_step_oom_message,
    profile_step,
)
from batchlm.runner.inputs import build_step_inputs
from batchlm.runner.kv_cache import kv_cache_oom_message, warn_override_past_budget

CPU = torch.device("cpu")


def test_graphs_cover_every_batch_up_to_the_cap_and_no_more() -> None:
    assert MAX_CAPTURE_BATCH == 512
    assert graph_batch_limit(32) == 32
    # --max-num-seqs 50000 captured a graph for every 16 rows up to 50000 (3,129 of them).
    assert graph_batch_limit(50_000) == MAX_CAPTURE_BATCH
    sizes = capture_sizes(graph_batch_limit(50_000))
    assert sizes[-1] == MAX_CAPTURE_BATCH and len(sizes) == 4 + MAX_CAPTURE_BATCH // 16
    # Verify steps: their rows up to MAX_VERIFY_GRAPH_ROWS, and never past the cap.
    assert graph_batch_limit(4, most_verify_rows=20) == 20
    assert graph_batch_limit(4, most_verify_rows=100_000) == MAX_VERIFY_GRAPH_ROWS
    assert graph_batch_limit(10_000, most_verify_rows=50_000) == MAX_CAPTURE_BATCH


def test_the_help_of_max_num_seqs_states_the_cap() -> None:
    from batchlm.server import cli as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    start = help_text.index("--max-num-seqs MAX_NUM_SEQS")
    assert f"decode batches of up to {MAX_CAPTURE_BATCH} requests" in help_text[start : start + 300]


def test_the_largest_step_fills_the_budget_past_the_context() -> None:
    # The profile ran min(budget, max_model_len) = 2048 tokens, while four 2048-token prompts fill
    # a step of 8192.
    assert LargestStep.of(8192, 32, 2048) == LargestStep(tokens=8192, sampled_rows=32)
    # No more than max_num_seqs whole contexts, and no more sampled rows than tokens.
    assert LargestStep.of(8192, 2, 2048) == LargestStep(tokens=4096, sampled_rows=2)
    assert LargestStep.of(16, 1024, 4096) == LargestStep(tokens=16, sampled_rows=16)
    assert LargestStep.of(8192, 1024, 131072) == LargestStep(tokens=8192, sampled_rows=1024)
    # A verify step samples each of its rows.
    assert LargestStep.of(8192, 4, 2048, most_verify_rows=20).sampled_rows == 20


def test_the_profile_step_is_whole_prompts_within_the_context() -> None:
    step, blocks = profile_step(4 * 2048 + 1, max_model_len=2048, block_size=16)
    lengths = [len(chunk.token_ids) for chunk in step.chunks]
    assert lengths == [1, 2048, 2048, 2048, 2048]  # the one-token chunk leads, as a decode would
    assert blocks == 128  # the prompts share one prompt's blocks
    assert all(max(chunk.new_block_ids) < blocks for chunk in step.chunks)
    inputs = build_step_inputs(step, 16, CPU)
    assert inputs.input_ids.shape[0] == 4 * 2048 + 1
    assert int(inputs.positions.max()) == 2047
    assert inputs.meta.num_decodes == 1
    assert int(inputs.meta.slot_mapping.max()) < blocks * 16
    # A budget below the context: one prompt, as before.
    step, blocks = profile_step(100, max_model_len=2048, block_size=16)
    assert [len(chunk.token_ids) for chunk in step.chunks] == [100] and blocks == 7


def test_the_profile_run_computes_and_samples_the_largest_step(
    tiny_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU profile pass, run on the CPU: the forward sees the whole budget (here 3.1 contexts)
    at positions within the context, and max_num_seqs rows are sampled."""
    from batchlm.runner.model_runner import ModelRunner

    model_dir = tiny_model_dir("llama")
    config = EngineConfig(
        model=str(model_dir), device="cpu", max_model_len=64, max_num_batched_tokens=200, max_num_seqs=8
    )
    runner = ModelRunner(config, model_dir)
    startup = runner._gpu_startup()
    assert startup.largest_step == LargestStep(tokens=200, sampled_rows=8)
    seen: dict[str, Any] = {}
    forward = runner.model.forward

    def spy_forward(input_ids: torch.Tensor, positions: torch.Tensor, *args: Any) -> torch.Tensor:
        seen["tokens"], seen["last_position"] = input_ids.shape[0], int(positions.max())
        return forward(input_ids, positions, *args)

    sample = runner.sampler.sample_on_device

    def spy_sample(logits: torch.Tensor, states: Any, **kwargs: Any) -> Any:
        seen["sampled_rows"] = logits.shape[0]
        seen["logprobs"] = states[0].params.logprobs
        seen["calls"] = seen.get("calls", 0) + 1
        return sample(logits, states, **kwargs)

    monkeypatch.setattr(runner.model, "forward", spy_forward)
    monkeypatch.setattr(runner.sampler, "sample_on_device", spy_sample)
    startup.profile_run()
    assert seen == {"tokens": 200, "last_position": 63, "sampled_rows": 8, "logprobs": 20, "calls": 2}


def test_a_step_past_the_device_is_refused_naming_the_flags() -> None:
    step = LargestStep.of(10**9, 4096, 131072)
    assert step.tokens == 4096 * 131072
    # Its hidden states alone: 2 x 2^29 tokens x 576 x 2 bytes, past any GPU.
    assert hidden_states_bytes(step, 576, 2) > 1000 * 2**30
    message = largest_step_oom_message(step, 16)
    assert "(536870912 tokens, 4096 of them sampled)" in message and "--max-num-batched-tokens" in message
    assert "--block-size" not in message
    # A block far above the default: the profile's scratch cache of whole blocks may be the cause.
    assert "or --block-size 1000000)" in largest_step_oom_message(step, 1_000_000)


def test_an_override_past_the_budget_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="batchlm.runner.kv_cache"):
        warn_override_past_budget(EngineConfig(num_gpu_blocks_override=10), 1024, 10 * 1024)
        assert not caplog.records
        warn_override_past_budget(EngineConfig(num_gpu_blocks_override=11), 1024, 10 * 1024)
        warn_override_past_budget(EngineConfig(num_gpu_blocks_override=1), 1024, -5)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "--num-gpu-blocks-override 11" in messages[0] and "than the 10 blocks" in messages[0]
    assert "than the 0 blocks" in messages[1]


def test_a_cache_that_does_not_fit_names_the_flag_that_sized_it() -> None:
    override = kv_cache_oom_message(EngineConfig(num_gpu_blocks_override=10**7), 10**7, 2**20)
    assert "10000000 KV-cache blocks (9765.62 GiB)" in override
    assert "--num-gpu-blocks-override" in override
    assert "--gpu-memory-utilization" in kv_cache_oom_message(EngineConfig(), 10**7, 2**20)


def test_a_gpu_block_too_large_for_the_memory_names_the_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchlm.models.loader import ModelShape
    from batchlm.runner import kv_cache

    shape = ModelShape(
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        hidden_size=64,
        vocab_size=320,
        max_model_len=512,
    )
    monkeypatch.setattr(kv_cache, "kv_budget_bytes", lambda config, device: 2**30)
    gpu = torch.device("cuda")
    with pytest.raises(ValueError, match=r"raise --gpu-memory-utilization .* or --block-size$"):
        kv_cache.num_blocks_for(EngineConfig(block_size=10**7), shape, torch.float32, gpu, 512)
    assert kv_cache.num_blocks_for(EngineConfig(), shape, torch.float32, gpu, 512) == 2**30 // 8192
