"""MXFP4 experts on the GPU: the grouped GEMM reading MXFP4 stacks against the same experts dense (the
values are exact in bf16, so only the sums' order may differ), inside a CUDA graph; gpt-oss's MXFP4
checkpoint loaded with its experts kept MXFP4 against the same weights dense; random MXFP4 weights of
an MXFP4 config; and serving that compiles nothing after start-up. GPU only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from devices import require_cuda

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")
require_cuda()

from batchlm.layers.activation import CLAMPED_SWIGLU  # noqa: E402
from batchlm.layers.moe import DOWN, GATE, UP, FusedMoE, MoESpec  # noqa: E402
from batchlm.models.mxfp4_weights import mxfp4_weight  # noqa: E402
from expert_stacks_harness import assert_computes_as_dense, assert_replays_as_dense  # noqa: E402

DEVICE = torch.device("cuda")
SPEC = MoESpec(
    32, 4, hidden_size=256, intermediate_size=96, renormalize=True, hidden_act=CLAMPED_SWIGLU,
    act_options=(("alpha", 1.702), ("limit", 7.0)), router_bias=True, expert_bias=True,
)  # fmt: skip


def _pair_layers(spec: MoESpec, dtype: torch.dtype) -> tuple[FusedMoE, FusedMoE]:
    """The same random MXFP4 experts (and biases) loaded dense and kept as MXFP4 stacks, on the GPU."""
    with torch.device(DEVICE):
        dense, kept = FusedMoE(spec).to(dtype), FusedMoE(spec).to(dtype)
    kept.keep_mxfp4(DEVICE)
    generator = torch.Generator().manual_seed(0)
    for expert in range(spec.num_experts):
        for part in (GATE, UP, DOWN):
            rows, cols = (
                (spec.hidden_size, spec.intermediate_size)
                if part == DOWN
                else (spec.intermediate_size, spec.hidden_size)
            )
            blocks = torch.randint(0, 256, (rows, cols // 32, 16), generator=generator, dtype=torch.uint8)
            scales = torch.randint(118, 124, (rows, cols // 32), generator=generator, dtype=torch.uint8)
            weight = mxfp4_weight(blocks, scales)
            dense.load_expert("experts", expert, part, weight)
            kept.load_expert("experts", expert, part, weight)
    if spec.expert_bias:
        for layer in (dense, kept):
            assert layer.gate_up_proj_bias is not None and layer.down_proj_bias is not None
            with torch.no_grad():
                layer.gate_up_proj_bias.normal_(0.0, 0.5, generator=torch.Generator(DEVICE).manual_seed(1))
                layer.down_proj_bias.normal_(0.0, 0.5, generator=torch.Generator(DEVICE).manual_seed(2))
    return dense, kept


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7, 64, 1000])
def test_mxfp4_stacks_compute_as_the_experts_dense(dtype: torch.dtype, tokens: int) -> None:
    dense, kept = _pair_layers(SPEC, dtype)
    assert kept.mxfp4 is not None and kept.gate_up_proj.numel() == 0
    assert_computes_as_dense(dense, kept, dtype, tokens)


def test_mxfp4_stacks_replay_in_a_cuda_graph() -> None:
    spec = MoESpec(64, 4, hidden_size=128, intermediate_size=64, renormalize=False)
    assert_replays_as_dense(*_pair_layers(spec, torch.bfloat16))


def _experts(llm: object) -> list[FusedMoE]:
    model = llm.engine_core.executor.model  # type: ignore[attr-defined]
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


def test_an_mxfp4_checkpoint_keeps_its_experts_mxfp4_and_serves_as_dense(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """gpt-oss's released form on the GPU in bf16: the experts stay MXFP4 stacks (no dense copy) and
    greedy tokens are those of the same weights loaded dense; the serving steps compile nothing."""
    from engine_runs import one_arrival_a_step

    from batchlm import LLM, SamplingParams
    from batchlm.kernels.compile_watch import compiles_after_startup
    from batchlm.tokenizer.builder import build_tokenizer
    from test_models_gpt_oss_mxfp4 import _mxfp4_dir, _write_checkpoints

    tmp_path = tmp_path_factory.mktemp("gpt-oss-mxfp4-gpu")
    tensors, dense_dir = _write_checkpoints(tmp_path)
    mxfp4_dir = _mxfp4_dir(tmp_path / "mxfp4", dense_dir, tensors, 2)
    for path in (dense_dir, mxfp4_dir):
        build_tokenizer(path)
    prompts = [list(range(10, 40)), [7, 300, 41, 5, 99], list(range(200, 215))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    tokens = {}
    for name, path in (("dense", dense_dir), ("mxfp4", mxfp4_dir)):
        llm = LLM(model=str(path), device="cuda", dtype="bfloat16", num_gpu_blocks_override=256)
        experts = _experts(llm)
        assert experts and all((e.mxfp4 is not None) == (name == "mxfp4") for e in experts)
        outputs = llm.generate(prompts, params)
        tokens[name] = [o.outputs[0].token_ids for o in outputs]
        if name == "mxfp4":
            assert all(e.gate_up_proj.numel() == 0 and e.down_proj.numel() == 0 for e in experts)
            before = compiles_after_startup()
            one_arrival_a_step(llm, 12, max_tokens_below=40, seed=1)
            assert compiles_after_startup() == before
        del llm
        torch.cuda.empty_cache()
    assert tokens["mxfp4"] == tokens["dense"]


def test_random_weights_of_an_mxfp4_config_are_mxfp4_stacks(tmp_path: Path) -> None:
    import json

    from batchlm import LLM, SamplingParams
    from batchlm.models.random_model import write_random_model
    from batchlm.tokenizer.builder import build_tokenizer

    path = write_random_model(tmp_path, "gpt_oss", {"swiglu_limit": 7.0})
    build_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "mxfp4"}})
    )
    llm = LLM(
        model=str(path), device="cuda", dtype="bfloat16", load_format="dummy", num_gpu_blocks_override=64
    )
    experts = _experts(llm)
    assert experts and all(e.mxfp4 is not None and e.mxfp4.gate_up.codes.any() for e in experts)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8


def test_a_gguf_files_mxfp4_experts_take_the_stacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's gpt-oss file on the GPU: its MXFP4 experts become the same stacks, and greedy tokens
    are those of the file with its experts dequantized to dense bf16 stacks."""
    from batchlm import LLM, SamplingParams
    from batchlm.models import gguf_model_dir, weight_methods
    from batchlm.tokenizer.builder import build_tokenizer
    from models_harness import PROMPTS
    from test_gguf_gpt_oss import MXFP4_EXPERTS, _write

    # The file's tokenizer is beside the point here (and needs a transformers that reads GGUF metadata
    # under this machine's numpy): a built one stands in.
    monkeypatch.setattr(
        gguf_model_dir, "_write_tokenizer", lambda gguf_path, out, model_type: build_tokenizer(out)
    )
    gguf_path = _write(tmp_path, "F32", MXFP4_EXPERTS)
    prompts = PROMPTS
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for kept in (True, False):
        if not kept:  # no expert type reads as MXFP4: the experts go dense
            monkeypatch.setattr(weight_methods, "MXFP4_QTYPE", "none")
        llm = LLM(model=str(gguf_path), device="cuda", dtype="bfloat16", num_gpu_blocks_override=128)
        experts = _experts(llm)
        assert experts and all((e.mxfp4 is not None) == kept for e in experts)
        tokens[kept] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
        torch.cuda.empty_cache()
    assert tokens[True] == tokens[False]
