"""What the tests of experts kept as GPU stacks (MXFP4, FP8, 4-bit groups) share. On the CPU: the
grouped GEMM reading random stacks against the same values dense (run under Triton's interpreter),
tensor-parallel ranks against one rank, a model served from stacks against the same model dense, and
which layers the loader keeps in which form. On a GPU (tests/gpu): a layer of stacks against the same
experts dense, eagerly and replayed in a CUDA graph, and an engine serving a checkpoint both ways."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm.kernels.fp8_stack import Fp8Stack
from batchlm.kernels.int4_stack import Int4Stack
from batchlm.kernels.mxfp4_layout import Mxfp4Stack
from batchlm.layers.moe import DOWN, GATE, UP, FusedMoE, MoESpec
from batchlm.layers.moe_mxfp4 import dequantize
from batchlm.layers.moe_routing import route_top_k
from batchlm.layers.quantization.base import LoadedWeight
from batchlm.layers.quantization.registry import DENSE_FORMAT
from batchlm.models import weight_methods
from batchlm.models.base import CausalLM
from batchlm.models.checkpoint import load_hf_config
from batchlm.models.loader import LoadedModel, load_model
from batchlm.models.random_model import write_random_model
from batchlm.models.registry import get_model_class
from models_harness import CPU, PROMPTS, greedy_generate, run_ranks, thread_groups
from quant_checkpoints import methods_as_on_a_gpu

CUDA = torch.device("cuda")

GroupedWeights = Mxfp4Stack | Fp8Stack | Int4Stack


def _mxfp4(experts: int, n: int, k: int, generator: torch.Generator) -> tuple[GroupedWeights, torch.Tensor]:
    codes = torch.randint(0, 256, (experts, n, k // 2), generator=generator, dtype=torch.uint8)
    scales = torch.randint(112, 136, (experts, n, k // 32), generator=generator, dtype=torch.uint8)
    scales[0, 0, 0] = 0  # the smallest scale, 2^-127: a float32 subnormal
    return Mxfp4Stack(codes, scales), dequantize(codes, scales, torch.float32)


def _fp8(experts: int, n: int, k: int, generator: torch.Generator) -> tuple[GroupedWeights, torch.Tensor]:
    values = (torch.randn(experts, n, k, generator=generator) * 100).to(torch.float8_e4m3fn)
    # The extremes: the largest magnitudes, the smallest subnormal and normal, and both zeros.
    extremes = [448.0, -448.0, 2.0**-9, -(2.0**-9), 2.0**-6, 0.0, -0.0, 7 * 2.0**-9]
    values[0, 0, : len(extremes)] = torch.tensor(extremes).to(torch.float8_e4m3fn)
    scales = torch.rand(experts, n, generator=generator) * 0.01 + 1e-4
    return Fp8Stack(values, scales), values.float() * scales[..., None]


def _int4(group: int) -> Callable[[int, int, int, torch.Generator], tuple[GroupedWeights, torch.Tensor]]:
    def make(experts: int, n: int, k: int, generator: torch.Generator) -> tuple[GroupedWeights, torch.Tensor]:
        codes = torch.randint(0, 256, (experts, n, k // 2), generator=generator, dtype=torch.uint8)
        scales = torch.rand(experts, n, k // group, generator=generator) * 0.01 + 1e-4
        zeros = torch.randint(0, 17, (experts, n, k // group), generator=generator, dtype=torch.uint8)
        values = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2).float()
        per_input = (zeros.float().repeat_interleave(group, -1), scales.repeat_interleave(group, -1))
        return Int4Stack(codes, scales, zeros), (values - per_input[0]) * per_input[1]

    return make


# Per form: (N, K, the stack maker) cases. Both tile shapes (N <= 64 takes narrower tiles), N not
# whole tiles; for 4-bit groups of 32, 64 and 128.
WIDENING_CASES = {
    "mxfp4": [(72, 96, _mxfp4), (40, 64, _mxfp4)],
    "fp8": [(72, 96, _fp8), (40, 64, _fp8)],
    "fp8-bits": [(72, 96, _fp8), (40, 64, _fp8)],  # widened by bit placement (GPUs before Ada)
    "int4": [(72, 256, _int4(32)), (40, 128, _int4(64)), (96, 256, _int4(128))],
}
WIDENS_EXACTLY = "grouped gemm widens exactly"


def check_the_grouped_gemm_widens(form: str) -> None:
    """Run inside Triton's interpreter (`run_interpreted`): the grouped GEMM over random stacks of
    `form` against the same values dense, at two block sizes, in float32 and float16 (standing for
    the half types: the interpreter rounds bfloat16 toward zero, numpy having none). The same
    products: numpy may sum a transposed tile in another order (float32 rounding), and the output's
    rounding to float16 may then differ by an ulp; a code or scale read wrongly would be far off."""
    from batchlm.kernels.moe_gemm import grouped_gemm
    from batchlm.layers.moe_routing import align_to_blocks

    generator = torch.Generator().manual_seed(0)
    experts, tokens, top_k = 5, 9, 2
    for n, k, make in WIDENING_CASES[form]:
        stack, dense32 = make(experts, n, k, generator)
        x = torch.randn(tokens, k, generator=generator)
        choice = route_top_k(torch.randn(tokens, experts, generator=generator), top_k, True)
        for dtype in (torch.float32, torch.float16):
            for block_m in (16, 32):
                blocks = align_to_blocks(choice.experts, experts, block_m)
                weights = choice.weights.reshape(-1)
                got = grouped_gemm(x.to(dtype), stack, blocks, top_k, weights, fp8_bits=form == "fp8-bits")
                want = grouped_gemm(x.to(dtype), dense32.to(dtype), blocks, top_k, weights)
                scale = want.float().abs().max().item()
                tolerance = 1e-6 if dtype == torch.float32 else 1e-3
                error = (got.float() - want.float()).abs().max().item()
                assert error <= tolerance * scale, (form, n, k, dtype, block_m, error, scale)
    print(WIDENS_EXACTLY)


def widening_script(form: str) -> str:
    """The script `run_interpreted` runs for `form`."""
    return f"from expert_stacks_harness import check_the_grouped_gemm_widens\ncheck_the_grouped_gemm_widens({form!r})"


def assert_ranks_sum_to_one_rank(single: FusedMoE, ranks: list[FusedMoE]) -> None:
    """Tensor-parallel ranks of the same experts, run on their threads, each give the single rank's
    output (the same products, the halves summed apart: float32 rounding)."""
    spec = single.spec
    x = torch.randn(5, spec.hidden_size, generator=torch.Generator().manual_seed(8))
    logits = torch.randn(5, spec.num_experts, generator=torch.Generator().manual_seed(9))
    choice = route_top_k(logits, spec.top_k, spec.renormalize)
    with torch.no_grad():
        expected = single(x, choice)
        outputs = run_ranks(lambda rank: ranks[rank](x, choice), len(ranks))
    scale = expected.abs().max().item()
    for output in outputs:
        torch.testing.assert_close(output, expected, atol=1e-5 * scale, rtol=1e-5)


def assert_checkpoint_serves_as_dense(model_dir: Path, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    """On the CPU: `model_dir` loaded with dense experts (a GPU's choice without stacks) and as on a GPU (`stand_in_a_gpu`), where
    every expert layer keeps its stacks in `form` ("fp8", "int4"), with no dense copy. The same
    weights, the same products: greedy tokens and their log-probabilities equal, prompt by prompt."""
    methods_as_on_a_gpu(monkeypatch)
    dense = load_model(model_dir, torch.float32, CPU, progress=False)
    stand_in_a_gpu(monkeypatch)
    kept = load_model(model_dir, torch.float32, CPU, progress=False)
    dense_experts = [m for m in dense.model.modules() if isinstance(m, FusedMoE)]
    kept_experts = [m for m in kept.model.modules() if isinstance(m, FusedMoE)]
    assert dense_experts and all(m.kept is None for m in dense_experts)
    assert all(getattr(m, form) is not None and m.gate_up_proj.numel() == 0 for m in kept_experts)
    assert_serves_as_dense(kept, dense)


def random_moe_experts(path: Path, quantization: str, monkeypatch: pytest.MonkeyPatch) -> list[FusedMoE]:
    """On the CPU, as on a GPU (`stand_in_a_gpu`): the expert layers of the random-weight model at
    `path` loaded under --quantization `quantization`."""
    stand_in_a_gpu(monkeypatch)
    loaded = load_model(
        path, torch.float32, CPU, random_weights=True, quantization=quantization, progress=False
    )
    experts = [m for m in loaded.model.modules() if isinstance(m, FusedMoE)]
    assert experts
    return experts


def assert_serves_as_dense(kept: LoadedModel, dense: LoadedModel, new_tokens: int = 6) -> None:
    """The same weights, the same products: greedy tokens and their log-probabilities equal, prompt
    by prompt."""
    for prompt in PROMPTS:
        tokens, logprobs = greedy_generate(kept, prompt, new_tokens)
        dense_tokens, dense_logprobs = greedy_generate(dense, prompt, new_tokens)
        assert tokens == dense_tokens and torch.equal(logprobs, dense_logprobs)


def built_moe_model(
    tmp_path: Path, model_type: str = "qwen3_moe", overrides: dict[str, Any] | None = None
) -> CausalLM:
    """A random mixture-of-experts model of `model_type`, built (not loaded)."""
    path = write_random_model(tmp_path, model_type, overrides)
    config = load_hf_config(path)
    model_class = get_model_class(config.architectures[0])
    model: CausalLM = model_class(model_class.read_config(config))
    return model


def experts_chosen(
    model: CausalLM, monkeypatch: pytest.MonkeyPatch, qtypes: dict[str, str], quantization: str | None = None
) -> dict[str, int]:
    """How many expert layers `assign_weight_methods` keeps as "fp8" and "int4" stacks and gives
    "dense" stacks on a GPU. Nothing is allocated: the kept forms are stood in for, so a stood-in
    layer is given dense stacks after it too."""
    calls = {"fp8": 0, "int4": 0, "dense": 0}

    def count(form: str) -> Callable[[FusedMoE, torch.device], None]:
        return lambda layer, device: calls.__setitem__(form, calls[form] + 1)

    monkeypatch.setattr(FusedMoE, "keep_fp8", count("fp8"))
    monkeypatch.setattr(FusedMoE, "keep_int4", count("int4"))
    monkeypatch.setattr(FusedMoE, "allocate_dense", count("dense"))
    methods = weight_methods.assign_weight_methods(
        model, DENSE_FORMAT, qtypes, CUDA, torch.bfloat16, quantization
    )
    assert methods["FP8 experts"] == calls["fp8"] and methods["INT4 experts"] == calls["int4"]
    return calls


def stand_in_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Experts are chosen on this CPU as on a GPU (their stacks run on any device)."""
    methods_as_on_a_gpu(monkeypatch)
    choose = weight_methods.gpu_experts_form
    monkeypatch.setattr(
        weight_methods,
        "gpu_experts_form",
        lambda types, quantization, device: choose(types, quantization, CUDA),
    )


# bf16 outputs of the same products summed in another order; float32 likewise.
GPU_TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


def pair_layers(
    spec: MoESpec,
    dtype: torch.dtype,
    form: str,
    weight: Callable[[int, int, int], LoadedWeight],
    device: torch.device = CUDA,
) -> tuple[FusedMoE, FusedMoE]:
    """The same experts (`weight(rows, cols, seed)` each projection) loaded dense and kept as stacks
    in `form` ("fp8", "int4"), on `device`."""
    with torch.device(device):
        dense, kept = FusedMoE(spec).to(dtype), FusedMoE(spec).to(dtype)
    getattr(kept, f"keep_{form}")(device)
    _load_every_expert(kept, weight)
    _load_every_expert(dense, weight)
    assert getattr(kept, form) is not None and kept.gate_up_proj.numel() == 0
    assert kept.missing_parts() == [] and dense.missing_parts() == []
    return dense, kept


def rank_layers(
    spec: MoESpec, form: str, weight: Callable[[int, int, int], LoadedWeight], world: int = 2
) -> list[FusedMoE]:
    """`world` tensor-parallel ranks (on threads) of the experts `pair_layers` loads, kept in `form`
    on the CPU: each loads the whole projections and keeps its share."""
    groups = thread_groups(world)
    ranks = [FusedMoE(spec, groups[rank]) for rank in range(world)]
    for layer in ranks:
        getattr(layer, f"keep_{form}")(CPU)
        _load_every_expert(layer, weight)
    return ranks


def _load_every_expert(layer: FusedMoE, weight: Callable[[int, int, int], LoadedWeight]) -> None:
    hidden, inter = layer.spec.hidden_size, layer.spec.intermediate_size
    for expert in range(layer.spec.num_experts):
        for part in (GATE, UP, DOWN):
            rows, cols = (hidden, inter) if part == DOWN else (inter, hidden)
            layer.load_expert("experts", expert, part, weight(rows, cols, 10 * expert + part))


def assert_computes_as_dense(dense: FusedMoE, kept: FusedMoE, dtype: torch.dtype, tokens: int) -> None:
    """On the GPU: the grouped GEMM over the stacks gives the dense layer's output, and (more loosely,
    the torch path rounding between its ops) the stacks widened expert by expert."""
    spec = kept.spec
    device = kept.gate_up_proj.device
    x = torch.randn(tokens, spec.hidden_size, device=device, dtype=dtype)
    choice = route_top_k(torch.randn(tokens, spec.num_experts, device=device), spec.top_k, True)
    with torch.no_grad():
        got = kept(x, choice)
        expected = dense(x, choice)
        per_expert = kept._add_down_bias(kept._forward_per_expert(x, choice), choice)
    # Relative to the outputs' scale: a sum's last bits in bf16 are a share of its magnitude.
    scale = max(1.0, expected.float().abs().max().item())
    tolerance = GPU_TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance * scale, rtol=tolerance)
    loose = 3e-2 if dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(got.float(), per_expert.float(), atol=loose * scale, rtol=loose)


def assert_replays_as_dense(dense: FusedMoE, kept: FusedMoE, tokens: int = 16) -> None:
    """On the GPU: the stacks' layer captured in a CUDA graph and replayed on new inputs and routing
    gives the dense layer's output each time."""
    spec = kept.spec
    device = kept.gate_up_proj.device
    x = torch.randn(tokens, spec.hidden_size, device=device, dtype=torch.bfloat16)
    logits = torch.randn(tokens, spec.num_experts, device=device)
    with torch.no_grad():
        kept(x, route_top_k(logits, spec.top_k, False))  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = kept(x, route_top_k(logits, spec.top_k, False))
        for seed in range(3):
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
            logits.copy_(
                torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed + 9)).to(logits)
            )
            graph.replay()
            expected = dense(x, route_top_k(logits, spec.top_k, False))
            torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def engine_experts(llm: object) -> list[FusedMoE]:
    model = llm.engine_core.executor.model  # type: ignore[attr-defined]
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


def serve_greedy(model_dir: Path, kept: Callable[[FusedMoE], bool], watch_compiles: bool) -> list[list[int]]:
    """On the GPU, in bf16: greedy tokens of three prompts from an engine on `model_dir`, whose expert
    layers must all satisfy `kept`; with `watch_compiles`, further serving steps (arrivals a step)
    must compile nothing."""
    from engine_runs import one_arrival_a_step

    from batchlm import LLM, SamplingParams
    from batchlm.kernels.compile_watch import compiles_after_startup

    prompts = [list(range(10, 40)), [7, 300, 41, 5, 99], list(range(200, 215))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    llm = LLM(model=str(model_dir), device="cuda", dtype="bfloat16", num_gpu_blocks_override=256)
    experts = engine_experts(llm)
    assert experts and all(kept(e) for e in experts)
    tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    if watch_compiles:
        before = compiles_after_startup()
        one_arrival_a_step(llm, 12, max_tokens_below=40, seed=1)
        assert compiles_after_startup() == before
    del llm
    torch.cuda.empty_cache()
    return tokens
