"""The Triton grouped GEMM of the fused MoE layer against the per-expert torch path on the GPU, at
decode and prefill sizes, inside a CUDA graph, and whole MoE models against transformers. GPU only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from devices import require_cuda

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")
require_cuda()

from batchlm.layers.activation import CLAMPED_SWIGLU  # noqa: E402
from batchlm.layers.moe import FusedMoE, MoESpec  # noqa: E402
from batchlm.layers.moe_routing import route_top_k  # noqa: E402

DEVICE = torch.device("cuda")
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 2e-5}


def _layer(spec: MoESpec, dtype: torch.dtype) -> FusedMoE:
    with torch.device(DEVICE):
        layer = FusedMoE(spec).to(dtype)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        layer.gate_up_proj.normal_(0.0, 0.05, generator=generator)
        layer.down_proj.normal_(0.0, 0.05, generator=generator)
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7, 64, 1000])
@pytest.mark.parametrize(("experts", "top_k"), [(128, 8), (8, 2)])
def test_grouped_gemm_matches_per_expert_path(
    dtype: torch.dtype, tokens: int, experts: int, top_k: int
) -> None:
    spec = MoESpec(experts, top_k, hidden_size=256, intermediate_size=96, renormalize=True)
    layer = _layer(spec, dtype)
    x = torch.randn(tokens, 256, device=DEVICE, dtype=dtype)
    choice = route_top_k(torch.randn(tokens, experts, device=DEVICE), top_k, True)
    with torch.no_grad():
        fused = layer(x, choice)
        expected = layer._forward_per_expert(x, choice)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(fused.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_grouped_gemm_adds_gpt_oss_biases_as_the_per_expert_path(dtype: torch.dtype, tokens: int) -> None:
    """gpt-oss's experts: each slot's gate/up bias (its rows are the slots in order) before the clamped
    SwiGLU, and the down bias weighted once after the sum, as on the per-expert path."""
    spec = MoESpec(
        32, 4, hidden_size=256, intermediate_size=96, renormalize=True, hidden_act=CLAMPED_SWIGLU,
        act_options=(("alpha", 1.702), ("limit", 0.5)), router_bias=True, expert_bias=True,
    )  # fmt: skip
    layer = _layer(spec, dtype)
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    assert layer.gate_up_proj_bias is not None and layer.down_proj_bias is not None
    with torch.no_grad():
        layer.gate_up_proj_bias.normal_(0.0, 0.5, generator=generator)
        layer.down_proj_bias.normal_(0.0, 0.5, generator=generator)
    x = torch.randn(tokens, 256, device=DEVICE, dtype=dtype)
    choice = route_top_k(torch.randn(tokens, 32, device=DEVICE), 4, True)
    with torch.no_grad():
        fused = layer(x, choice)
        expected = layer._add_down_bias(layer._forward_per_expert(x, choice), choice)
        layer.gate_up_proj_bias.zero_()
        unbiased = layer(x, choice)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(fused.float(), expected.float(), atol=tolerance, rtol=tolerance)
    # The gate/up bias moves the output well past the rounding (~0.14 at most in bf16 here).
    assert (unbiased.float() - expected.float()).abs().max() > 3 * tolerance


def test_grouped_gemm_replays_in_a_cuda_graph() -> None:
    spec = MoESpec(64, 4, hidden_size=128, intermediate_size=64, renormalize=False)
    layer = _layer(spec, torch.bfloat16)
    x = torch.randn(16, 128, device=DEVICE, dtype=torch.bfloat16)
    logits = torch.randn(16, 64, device=DEVICE)
    with torch.no_grad():
        layer(x, route_top_k(logits, 4, False))  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x, route_top_k(logits, 4, False))
        for seed in range(3):
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
            logits.copy_(
                torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed + 9)).to(logits)
            )
            graph.replay()
            expected = layer._forward_per_expert(x, route_top_k(logits, 4, False))
            torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_moe_model_greedy_matches_transformers(tiny_model_dir: Callable[..., Path], model_type: str) -> None:
    """float32 on the GPU through the grouped GEMM, with CUDA graphs for the decode steps; transformers
    runs its plain per-expert loop (its default grouped_mm may compute float32 in lower precision)."""
    from transformers import AutoModelForCausalLM

    from batchlm import LLM, SamplingParams
    from models_harness import hf_generated

    model_dir = tiny_model_dir(model_type, num_hidden_layers=3)
    prompts = [list(range(10, 40)), [7, 300, 41, 5, 99]]
    hf = (
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager")
        .to(DEVICE)
        .eval()
    )
    expected = [hf_generated(hf, prompt, 16) for prompt in prompts]
    # A fixed KV cache: sized from free memory, it would count what earlier tests in this process hold.
    llm = LLM(model=str(model_dir), device="cuda", dtype="float32", num_gpu_blocks_override=256)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_serving_a_moe_model_compiles_nothing_after_startup(tiny_model_dir: Callable[..., Path]) -> None:
    """Start-up warms every grouped-GEMM variant (block sizes, slot counts) that steps can meet."""
    from engine_runs import one_arrival_a_step

    from batchlm import LLM
    from batchlm.kernels.compile_watch import compiles_after_startup

    # 16 experts, 4 per token: a shape no other test uses, so nothing is in Triton's in-process cache.
    model_dir = tiny_model_dir(
        "qwen3_moe",
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=80,
        max_position_embeddings=2048,
    )
    llm = LLM(
        model=str(model_dir),
        device="cuda",
        dtype="bfloat16",
        max_model_len=1536,
        num_gpu_blocks_override=1024,
    )
    before = compiles_after_startup()
    one_arrival_a_step(llm, 40, max_tokens_below=120, seed=1)
    assert compiles_after_startup() == before
