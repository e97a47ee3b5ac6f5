"""--kv-cache-dtype: which dtype the runner allocates (auto's float16 on a CPU for GGUF files and
quantized weights), where fp8, fp16 and fp32 are refused, how its size shows in the block count and
/metrics, and the CPU engine over a float16 cache against a float32 one (the FP8 kernels themselves:
tests/gpu/test_fp8_kv_cache.py; the CPU kernels over a float16 cache: tests/test_cpu_decode_attention.py
and tests/test_cpu_fused_decode.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from batchlm import LLM, SamplingParams
from batchlm.engine.client import EngineStats
from batchlm.models.loader import ModelShape
from batchlm.runner.kv_cache import (
    bytes_per_block,
    kv_cache_dtype_name,
    layer_kv_scales,
    resolve_kv_cache_dtype,
)
from batchlm.runner.model_runner import ModelRunner
from batchlm.server.metrics import EngineStatsCollector
from gguf_builder import write_tiny_gguf

CUDA = torch.device("cuda")
SHAPE = ModelShape(32, 32, 8, 128, 4096, 128256, 8192)


@pytest.fixture
def hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_auto_is_the_model_dtype_and_fp8_is_e4m3(hopper: None) -> None:
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, CUDA, "triton") == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16, CUDA, "triton") == torch.float8_e4m3fn
    assert kv_cache_dtype_name(torch.float8_e4m3fn) == "fp8_e4m3"


@pytest.mark.parametrize(("device", "backend"), [(torch.device("cpu"), "torch"), (CUDA, "torch")])
def test_fp8_is_refused_without_the_triton_kernels(device: torch.device, backend: str) -> None:
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8 needs a CUDA GPU"):
        resolve_kv_cache_dtype("fp8", torch.float32, device, backend)


def test_gpus_before_ada_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"fp8 needs an NVIDIA GPU with FP8 support .* this one is 8\.0"):
        resolve_kv_cache_dtype("fp8", torch.bfloat16, CUDA, "triton")


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown --kv-cache-dtype 'int4'"):
        resolve_kv_cache_dtype("int4", torch.bfloat16, CUDA, "triton")


def test_an_fp8_block_takes_half_the_bytes() -> None:
    assert bytes_per_block(SHAPE, 16, torch.float8_e4m3fn) * 2 == bytes_per_block(SHAPE, 16, torch.bfloat16)


def test_checkpoint_scales_fill_in_per_layer() -> None:
    assert layer_kv_scales({1: {"k": 0.5, "v": 0.25}, 2: {"v": 2.0}}, 3) == [
        (1.0, 1.0),
        (0.5, 0.25),
        (1.0, 2.0),
    ]


@dataclass
class StatsOnly:
    snapshot: EngineStats
    is_ready: bool = True
    is_dead: bool = False

    def stats(self) -> EngineStats:
        return self.snapshot


def test_metrics_report_blocks_by_bits_per_element() -> None:
    stats = EngineStats(kv_cache_blocks=2048, kv_cache_bits=8)
    families = {m.name: m for m in EngineStatsCollector(StatsOnly(stats)).collect()}  # type: ignore[arg-type]
    sample = families["batchlm_kv_cache_blocks"].samples[0]
    assert sample.labels == {"bits": "8"} and sample.value == 2048
    unknown = {m.name for m in EngineStatsCollector(StatsOnly(EngineStats())).collect()}  # type: ignore[arg-type]
    assert "batchlm_kv_cache_blocks" not in unknown


def test_fp16_is_float16_on_the_cpu_and_refused_on_a_gpu() -> None:
    assert resolve_kv_cache_dtype("fp16", torch.float32, torch.device("cpu"), "torch") == torch.float16
    assert kv_cache_dtype_name(torch.float16) == "float16"
    with pytest.raises(ValueError, match="--kv-cache-dtype fp16 is for the CPU"):
        resolve_kv_cache_dtype("fp16", torch.bfloat16, CUDA, "triton")


def test_a_float16_block_takes_half_a_float32_blocks_bytes() -> None:
    assert bytes_per_block(SHAPE, 16, torch.float16) * 2 == bytes_per_block(SHAPE, 16, torch.float32)


def test_the_cpu_engine_over_a_float16_cache(tiny_model_dir: Callable[..., Path]) -> None:
    """Decodes, prompts after cached context and prefix-cache hits read the half cache; the greedy tokens
    and their log-probabilities stay those of a float32 cache (a float model's default) within half's
    rounding."""
    model = str(tiny_model_dir("llama"))
    half = LLM(model=model, device="cpu", kv_cache_dtype="fp16", max_num_batched_tokens=32)
    full = LLM(model=model, device="cpu", max_num_batched_tokens=32)
    runner = half.engine_core.executor
    assert isinstance(runner, ModelRunner)
    assert {cache.dtype for cache in runner.kv_caches} == {torch.float16}
    generator = torch.Generator().manual_seed(5)
    # 5 tokens; 70 (prefilled in chunks of 32, the later ones after cached context); the 70 again
    # (its first 64 from the prefix cache).
    prompts = [torch.randint(10, 300, (n,), generator=generator).tolist() for n in (5, 70)]
    prompts.append(prompts[1])
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0)
    cached = []
    for prompt in prompts:
        result = half.generate([prompt], params)[0]
        cached.append(result.num_cached_tokens)
        ours, theirs = result.outputs[0], full.generate([prompt], params)[0].outputs[0]
        assert ours.token_ids == theirs.token_ids
        assert ours.logprobs is not None and theirs.logprobs is not None
        for mine, reference in zip(ours.logprobs, theirs.logprobs, strict=True):
            assert abs(mine.logprob - reference.logprob) < 1e-3
    assert cached == [0, 0, 64]


def test_auto_on_the_cpu_is_float16_for_quantized_weights_and_fp32_asks_for_float32() -> None:
    cpu = torch.device("cpu")
    assert (
        resolve_kv_cache_dtype("auto", torch.float32, cpu, "torch", quantized_weights=True) == torch.float16
    )
    assert resolve_kv_cache_dtype("auto", torch.float32, cpu, "torch") == torch.float32
    assert (
        resolve_kv_cache_dtype("fp32", torch.float32, cpu, "torch", quantized_weights=True) == torch.float32
    )
    # A GPU's auto stays the model's dtype whatever its weights.
    assert (
        resolve_kv_cache_dtype("auto", torch.bfloat16, CUDA, "triton", quantized_weights=True)
        == torch.bfloat16
    )
    with pytest.raises(ValueError, match="--kv-cache-dtype fp32 is for the CPU"):
        resolve_kv_cache_dtype("fp32", torch.bfloat16, CUDA, "triton")


@pytest.mark.parametrize("qtype", ["Q8_0", "F32"])
def test_a_gguf_models_cpu_cache_is_float16_unless_asked_for_float32(tmp_path: Path, qtype: str) -> None:
    # Any GGUF file, quantized or not, as llama.cpp keeps its cache.
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", qtype, True)
    for kv_cache_dtype, expected in (("auto", torch.float16), ("fp32", torch.float32)):
        llm = LLM(model=str(gguf), device="cpu", kv_cache_dtype=kv_cache_dtype, cpu_kv_cache_gib=0.01)
        runner = llm.engine_core.executor
        assert isinstance(runner, ModelRunner)
        assert {cache.dtype for cache in runner.kv_caches} == {expected}
        assert len(llm.generate([[5, 17, 42]], SamplingParams(max_tokens=4))[0].outputs[0].token_ids) == 4
