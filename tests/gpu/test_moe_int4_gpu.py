"""4-bit experts on the GPU: the grouped GEMM reading 4-bit stacks against the same experts dense (the
widened values are the dequantized ones, so only the sums' order may differ), inside a CUDA graph; a
GPTQ checkpoint's experts kept 4-bit serving the tokens of the same experts dense, compiling nothing
after start-up; random weights under --quantization w4a16. GPU only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from devices import require_cuda

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")
require_cuda()

from batchlm.layers.moe import DOWN, GATE, UP, FusedMoE, MoESpec  # noqa: E402
from batchlm.layers.moe_routing import route_top_k  # noqa: E402
from quant_checkpoints import random_int4  # noqa: E402

DEVICE = torch.device("cuda")
# bf16 outputs of the same products summed in another order; float32 likewise.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-5}
SPEC = MoESpec(32, 4, hidden_size=256, intermediate_size=128, renormalize=True)


def _pair_layers(spec: MoESpec, dtype: torch.dtype) -> tuple[FusedMoE, FusedMoE]:
    """The same random 4-bit experts (groups of 64) loaded dense and kept as 4-bit stacks, on the GPU."""
    with torch.device(DEVICE):
        dense, kept = FusedMoE(spec).to(dtype), FusedMoE(spec).to(dtype)
    kept.keep_int4(DEVICE)
    hidden, inter = spec.hidden_size, spec.intermediate_size
    for expert in range(spec.num_experts):
        for part in (GATE, UP, DOWN):
            rows, cols = (hidden, inter) if part == DOWN else (inter, hidden)
            weight = random_int4(rows, cols, 64, symmetric=False, seed=10 * expert + part)
            dense.load_expert("experts", expert, part, weight)
            kept.load_expert("experts", expert, part, weight)
    return dense, kept


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7, 64, 1000])
def test_int4_stacks_compute_as_the_experts_dense(dtype: torch.dtype, tokens: int) -> None:
    dense, kept = _pair_layers(SPEC, dtype)
    assert kept.int4 is not None and kept.gate_up_proj.numel() == 0
    x = torch.randn(tokens, SPEC.hidden_size, device=DEVICE, dtype=dtype)
    choice = route_top_k(torch.randn(tokens, SPEC.num_experts, device=DEVICE), SPEC.top_k, True)
    with torch.no_grad():
        got = kept(x, choice)
        expected = dense(x, choice)
        per_expert = kept._forward_per_expert(x, choice)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)
    loose = 3e-2 if dtype == torch.bfloat16 else 2e-5  # the torch path rounds between its ops
    torch.testing.assert_close(got.float(), per_expert.float(), atol=loose, rtol=loose)


def test_int4_stacks_replay_in_a_cuda_graph() -> None:
    spec = MoESpec(64, 4, hidden_size=128, intermediate_size=128, renormalize=False)
    dense, kept = _pair_layers(spec, torch.bfloat16)
    x = torch.randn(16, 128, device=DEVICE, dtype=torch.bfloat16)
    logits = torch.randn(16, 64, device=DEVICE)
    with torch.no_grad():
        kept(x, route_top_k(logits, 4, False))  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = kept(x, route_top_k(logits, 4, False))
        for seed in range(3):
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
            logits.copy_(
                torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed + 9)).to(logits)
            )
            graph.replay()
            expected = dense(x, route_top_k(logits, 4, False))
            torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def _experts(llm: object) -> list[FusedMoE]:
    model = llm.engine_core.executor.model  # type: ignore[attr-defined]
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


def test_a_gptq_checkpoint_keeps_its_experts_4_bit_and_serves_as_dense(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPTQ Qwen3-MoE checkpoint in bf16: its experts stay 4-bit stacks (no dense copy) and greedy
    tokens are those of the same experts dense; the serving steps compile nothing."""
    from engine_runs import one_arrival_a_step

    from batchlm import LLM, SamplingParams
    from batchlm.kernels.compile_watch import compiles_after_startup
    from batchlm.models import weight_methods
    from batchlm.tokenizer.builder import build_tokenizer
    from test_moe_int4 import _gptq_moe_checkpoint

    model_dir = _gptq_moe_checkpoint(tmp_path)
    build_tokenizer(model_dir)
    prompts = [list(range(10, 40)), [7, 300, 41, 5, 99], list(range(200, 215))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    tokens = {}
    for name in ("int4", "dense"):
        if name == "dense":
            monkeypatch.setattr(weight_methods, "gpu_experts_form", lambda *args: None)
        llm = LLM(model=str(model_dir), device="cuda", dtype="bfloat16", num_gpu_blocks_override=256)
        experts = _experts(llm)
        assert experts and all((e.int4 is not None) == (name == "int4") for e in experts)
        outputs = llm.generate(prompts, params)
        tokens[name] = [o.outputs[0].token_ids for o in outputs]
        if name == "int4":
            assert all(e.gate_up_proj.numel() == 0 and e.down_proj.numel() == 0 for e in experts)
            before = compiles_after_startup()
            one_arrival_a_step(llm, 12, max_tokens_below=40, seed=1)
            assert compiles_after_startup() == before
        del llm
        torch.cuda.empty_cache()
    assert tokens["int4"] == tokens["dense"]


def test_random_weights_under_quantization_w4a16_are_4_bit_stacks(tmp_path: Path) -> None:
    from batchlm import LLM, SamplingParams
    from batchlm.models.random_model import write_random_model
    from batchlm.tokenizer.builder import build_tokenizer
    from test_moe_int4 import WHOLE

    path = write_random_model(tmp_path, "qwen3_moe", WHOLE)
    build_tokenizer(path)
    llm = LLM(
        model=str(path), device="cuda", dtype="bfloat16", load_format="dummy", quantization="w4a16",
        num_gpu_blocks_override=64,
    )  # fmt: skip
    experts = _experts(llm)
    assert experts and all(e.int4 is not None and e.int4.gate_up.codes.any() for e in experts)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8
