"""GPU start-ups with extreme but accepted flags: they start in seconds or refuse with a message that
names the flag, and what they measure covers the steps they then serve. The sizes themselves are
checked on the CPU in tests/test_gpu_startup_sizes.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from devices import require_cuda

from batchlm import LLM, SamplingParams
from batchlm.runner import gpu_startup, kv_cache
from batchlm.runner.cuda_graph import MAX_CAPTURE_BATCH, capture_sizes
from batchlm.runner.model_runner import ModelRunner

pytestmark = pytest.mark.gpu

require_cuda()


def _runner(llm: LLM) -> ModelRunner:
    runner = llm.engine_core.executor
    assert isinstance(runner, ModelRunner)
    return runner


def _prompts(count: int, length: int) -> list[list[int]]:
    """Distinct prompts (no prefix-cache hits between them)."""
    return [[10 + (index * 7 + position * 13) % 1000 for position in range(length)] for index in range(count)]


def test_a_huge_max_num_seqs_captures_graphs_up_to_the_cap(tiny_model_dir: Callable[..., Path]) -> None:
    """--max-num-seqs 4096 captured 260 graphs, each with block-table rows for 4096 requests; now the
    capture stops at MAX_CAPTURE_BATCH and a larger decode batch runs eagerly, with the same tokens."""
    llm = LLM(
        model=str(tiny_model_dir("llama")),
        device="cuda",
        dtype="float32",
        max_num_seqs=4096,
        num_gpu_blocks_override=4096,
        speculative="off",
    )
    graphs = _runner(llm).decode_graphs
    assert graphs is not None and graphs.max_batch == MAX_CAPTURE_BATCH
    assert sorted(graphs.graphs) == capture_sizes(MAX_CAPTURE_BATCH)
    assert graphs.buffers.block_tables.shape[0] == MAX_CAPTURE_BATCH
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    # 600 requests of one prompt decode as one batch past the largest graph.
    outputs = llm.generate([[5, 6, 7]] * 600, params)
    tokens = {tuple(output.outputs[0].token_ids) for output in outputs}
    assert len(tokens) == 1 and len(next(iter(tokens))) == 4
    alone = llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids
    assert tuple(alone) in tokens


def test_the_profile_run_computes_a_budget_past_the_context(
    tiny_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4096-token budget with a 64-token context: the profile computed 64 tokens, while one step
    then prefills 64 prompts of 63 tokens (4032 tokens)."""
    profiled: list[int] = []
    build = gpu_startup.build_step_inputs

    def spy(*args: Any, **kwargs: Any) -> Any:
        inputs = build(*args, **kwargs)
        profiled.append(int(inputs.input_ids.shape[0]))
        return inputs

    monkeypatch.setattr(gpu_startup, "build_step_inputs", spy)
    llm = LLM(
        model=str(tiny_model_dir("llama")),
        device="cuda",
        dtype="float32",
        max_model_len=64,
        max_num_batched_tokens=4096,
        max_num_seqs=64,
        num_gpu_blocks_override=512,
    )
    assert profiled and set(profiled) == {4096}
    outputs = llm.generate(_prompts(64, 63), SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    assert [len(output.outputs[0].token_ids) for output in outputs] == [1] * 64


def test_the_profile_run_holds_what_the_largest_sampled_step_takes(
    tiny_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """512 rows of a 32768-token vocabulary sampled with top-p, 20 logprobs and a penalty take
    [512, 32768] tensors several times over (hundreds of MiB); the profile sampled no row, so the KV
    cache could take memory such a step then needed. The step's peak, less the KV cache, now stays
    within the peak the profile measured (with 64 MiB for the small buffers made after it)."""
    measured: list[int] = []
    budget = kv_cache.kv_budget_bytes

    def spy(config: Any, device: torch.device) -> int:
        measured.append(torch.cuda.max_memory_reserved(device))
        return budget(config, device)

    monkeypatch.setattr(kv_cache, "kv_budget_bytes", spy)
    llm = LLM(
        model=str(tiny_model_dir("llama", vocab_size=32768)),
        device="cuda",
        dtype="float32",
        max_model_len=64,
        max_num_seqs=512,
        num_gpu_blocks_override=2048,
        enforce_eager=True,
        speculative="off",
        async_scheduling="off",
    )
    (profile_peak,) = measured
    cache_bytes = sum(cache.numel() * cache.element_size() for cache in _runner(llm).kv_caches)
    params = SamplingParams(
        temperature=1.0, top_p=0.5, logprobs=20, presence_penalty=0.5, max_tokens=3, ignore_eos=True
    )
    llm.generate(_prompts(512, 4), params)  # warms the allocator's pools for the step's shapes
    torch.cuda.reset_peak_memory_stats()
    outputs = llm.generate(_prompts(512, 4), params)
    assert all(len(output.outputs[0].token_ids) == 3 for output in outputs)
    step_peak = torch.cuda.max_memory_allocated()
    assert step_peak - cache_bytes <= profile_peak + (64 << 20), (step_peak, cache_bytes, profile_peak)


def test_a_step_past_the_gpu_is_refused_naming_the_budget(tiny_model_dir: Callable[..., Path]) -> None:
    """A budget of 10^12 tokens with 2^20 requests of 512 tokens: 2^29 tokens a step, whose hidden
    states alone pass any GPU; refused before its inputs are built, not after minutes on the host."""
    with pytest.raises(ValueError, match=r"536870912 tokens.*lower --max-num-batched-tokens"):
        LLM(
            model=str(tiny_model_dir("llama")),
            device="cuda",
            dtype="float32",
            max_num_batched_tokens=10**12,
            max_num_seqs=1 << 20,
        )


def test_a_block_override_past_the_gpu_is_refused_naming_it(tiny_model_dir: Callable[..., Path]) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # 2 layers, 2 KV heads of 16 dims, float32, 16-token blocks
    with pytest.raises(ValueError, match=r"KV-cache blocks .* lower --num-gpu-blocks-override"):
        LLM(
            model=str(tiny_model_dir("llama")),
            device="cuda",
            dtype="float32",
            num_gpu_blocks_override=4 * total // per_block,
        )


def test_block_size_one_with_a_long_context_starts_and_serves(tiny_model_dir: Callable[..., Path]) -> None:
    """Block tables of 131072 entries a request: the graphs' static tables stay at MAX_CAPTURE_BATCH
    rows (256 MiB) with --max-num-seqs 600."""
    llm = LLM(
        model=str(tiny_model_dir("llama", max_position_embeddings=131072)),
        device="cuda",
        dtype="float32",
        block_size=1,
        max_num_seqs=600,
        num_gpu_blocks_override=100_000,
    )
    graphs = _runner(llm).decode_graphs
    assert graphs is not None
    assert tuple(graphs.buffers.block_tables.shape) == (MAX_CAPTURE_BATCH, 131072)
    outputs = llm.generate(_prompts(8, 40), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert [len(output.outputs[0].token_ids) for output in outputs] == [8] * 8


def test_a_utilization_near_zero_is_refused_naming_it(tiny_model_dir: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match="raise --gpu-memory-utilization"):
        LLM(model=str(tiny_model_dir("llama")), device="cuda", dtype="float32", gpu_memory_utilization=1e-6)


def test_graphs_that_run_out_of_memory_name_the_flags(
    tiny_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What --gpu-memory-utilization close to 1 meets: the KV cache leaves the graphs no room."""
    from batchlm.runner.cuda_graph import DecodeGraphs

    def out_of_memory(self: DecodeGraphs) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(DecodeGraphs, "capture", out_of_memory)
    expected = r"lower --gpu-memory-utilization or --num-gpu-blocks-override, or pass --enforce-eager$"
    with pytest.raises(ValueError, match=expected):
        LLM(model=str(tiny_model_dir("llama")), device="cuda", dtype="float32", num_gpu_blocks_override=64)
