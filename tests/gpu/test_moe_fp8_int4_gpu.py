"""FP8 and 4-bit experts on the GPU: the grouped GEMM reading FP8 / 4-bit stacks against the same
experts dense (the widened values are the dequantized ones, so only the sums' order may differ),
inside a CUDA graph; an FP8 (compressed-tensors) and a GPTQ checkpoint's experts kept in their form
serving the tokens of the same experts dense, compiling nothing after start-up; random weights under
--quantization fp8 / w4a16. GPU only (the FP8 checkpoint and --quantization fp8: Ada, Hopper and later, for their FP8 linears)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from devices import require_cuda

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")
require_cuda()

from batchlm.layers.moe import FusedMoE, MoESpec  # noqa: E402
from batchlm.layers.quantization.base import LoadedWeight  # noqa: E402
from batchlm.layers.quantization.forms import has_fp8_tensor_cores, quantize_fp8_rows  # noqa: E402
from expert_stacks_harness import (  # noqa: E402
    assert_computes_as_dense,
    assert_replays_as_dense,
    engine_experts,
    pair_layers,
    serve_greedy,
)
from quant_checkpoints import random_int4  # noqa: E402

# FP8 linears (an FP8 checkpoint's, --quantization fp8) need FP8 tensor cores; FP8 experts do not.
NEEDS_FP8 = pytest.mark.skipif(
    not has_fp8_tensor_cores(torch.device("cuda")), reason="FP8 linears need an Ada or Hopper GPU"
)
FORMS = ["fp8", "int4"]
CHECKPOINT_FORMS = [pytest.param("fp8", marks=NEEDS_FP8), "int4"]


def _fp8(rows: int, cols: int, seed: int) -> LoadedWeight:
    return quantize_fp8_rows(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05)


def _int4(rows: int, cols: int, seed: int) -> LoadedWeight:
    return random_int4(rows, cols, 64, symmetric=False, seed=seed)  # groups of 64


WEIGHTS: dict[str, Callable[[int, int, int], LoadedWeight]] = {"fp8": _fp8, "int4": _int4}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7, 64, 1000])
def test_stacks_compute_as_the_experts_dense(form: str, dtype: torch.dtype, tokens: int) -> None:
    spec = MoESpec(32, 4, hidden_size=256, intermediate_size=128, renormalize=True)
    assert_computes_as_dense(*pair_layers(spec, dtype, form, WEIGHTS[form]), dtype, tokens)


@pytest.mark.parametrize("form", FORMS)
def test_stacks_replay_in_a_cuda_graph(form: str) -> None:
    spec = MoESpec(64, 4, hidden_size=128, intermediate_size=128, renormalize=False)
    assert_replays_as_dense(*pair_layers(spec, torch.bfloat16, form, WEIGHTS[form]))


def test_fp8_widened_by_bit_placement_equals_the_e4m3_conversion() -> None:
    """The widening GPUs before Ada take gives the very outputs of the e4m3 conversion's."""
    from batchlm.kernels.moe_gemm import block_m_for, grouped_gemm
    from batchlm.layers.moe_routing import align_to_blocks, route_top_k

    spec = MoESpec(32, 4, hidden_size=256, intermediate_size=128, renormalize=True)
    _, kept = pair_layers(spec, torch.bfloat16, "fp8", WEIGHTS["fp8"])
    assert kept.fp8 is not None
    for tokens in (1, 64, 1000):
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
        choice = route_top_k(torch.randn(tokens, 32, device="cuda"), 4, True)
        blocks = align_to_blocks(choice.experts, 32, block_m_for(tokens * 4, 32))
        native = grouped_gemm(x, kept.fp8.gate_up, blocks, 4, fp8_bits=False)
        assert torch.equal(grouped_gemm(x, kept.fp8.gate_up, blocks, 4, fp8_bits=True), native)


def _checkpoint(form: str, tmp_path: Path) -> Path:
    from test_moe_fp8 import _fp8_moe_checkpoint
    from test_moe_int4 import _int4_moe_checkpoint

    return _fp8_moe_checkpoint(tmp_path) if form == "fp8" else _int4_moe_checkpoint(tmp_path)


@pytest.mark.parametrize("form", CHECKPOINT_FORMS)
def test_a_quantized_checkpoint_keeps_its_experts_and_serves_as_dense(
    form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compressed-tensors FP8 or a GPTQ Qwen3-MoE checkpoint in bf16: its experts stay stacks in
    their form (no dense copy) and greedy tokens are those of the same experts dense; the serving
    steps compile nothing."""
    from batchlm.models import weight_methods
    from batchlm.tokenizer.builder import build_tokenizer

    model_dir = _checkpoint(form, tmp_path)
    build_tokenizer(model_dir)

    def kept(experts: FusedMoE) -> bool:
        return getattr(experts, form) is not None and experts.gate_up_proj.numel() == 0

    tokens = serve_greedy(model_dir, kept, watch_compiles=True)
    monkeypatch.setattr(weight_methods, "gpu_experts_form", lambda *args: None)
    assert tokens == serve_greedy(model_dir, lambda experts: experts.kept is None, watch_compiles=False)


@pytest.mark.parametrize(
    ("form", "quantization"), [pytest.param("fp8", "fp8", marks=NEEDS_FP8), ("int4", "w4a16")]
)
def test_random_weights_under_quantization_are_stacks(form: str, quantization: str, tmp_path: Path) -> None:
    from batchlm import LLM, SamplingParams
    from batchlm.models.random_model import write_random_model
    from batchlm.tokenizer.builder import build_tokenizer
    from test_moe_int4 import WHOLE

    path = write_random_model(tmp_path, "qwen3_moe", WHOLE)
    build_tokenizer(path)
    llm = LLM(
        model=str(path), device="cuda", dtype="bfloat16", load_format="dummy", quantization=quantization,
        num_gpu_blocks_override=64,
    )  # fmt: skip
    experts = engine_experts(llm)
    assert experts and all(getattr(e, form) is not None and e.gate_up_proj.numel() == 0 for e in experts)
    for stacks in (getattr(e, form) for e in experts):  # filled: random values, not the zeros allocated
        gate_up, down = stacks.expert_weights(0, torch.float32)
        assert gate_up.abs().sum() > 0 and down.abs().sum() > 0
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8
