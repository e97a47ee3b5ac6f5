"""GGUF models and --quantization int8 through the quantized CPU kernels (layers/quantization/
cpu_quantized.py): which layers take the method, and logits within a stated tolerance of the same
weights dequantized to float32.

Tolerance: the kernels round each block of 32 activations to int8 twice (its codes, then the codes
of what they left over: ~1/254^2 of its largest magnitude) before every matmul. Where the kernels
hold the file's exact weights (Q8_0, Q4_0, Q3_K, MXFP4) that moves these 2-layer random models' logits by
3e-5 to 1.1e-4 of the largest (the tests allow 1e-3); Q4_K and Q5_K by 1.3e-3 to 2.5e-3 (their
sub-block scales and biases are rounded to float16 at load; an untied Q5_K llama's by 2.95e-3, too
near the bound to be a case here); the tests allow 3e-3. Weights the kernels requantize (Q6_K to
8-bit blocks: 1.2%; int8 of a float checkpoint) are allowed 3%. Both require the same top token wherever the reference's top two are further apart.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from batchlm.kernels.cpu_decode_stack import stack_library
from batchlm.kernels.cpu_quant import quant_library
from batchlm.kernels.dense_blocks import from_dense_q4, from_dense_q8
from batchlm.kernels.quant_blocks import dequantize
from batchlm.kernels.quant_panels import QuantizedWeight, dequantize_packed
from batchlm.layers.moe import FusedMoE
from batchlm.layers.quantization import registry
from batchlm.layers.quantization.cpu_quantized import CPU_QUANTIZED, CPU_QUANTIZED_4BIT, store
from batchlm.layers.quantization.layer import MethodLayer
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.load_checks import check_quantization
from batchlm.models.loader import LoadedModel, load_model
from batchlm.models.random_model import write_random_model
from gguf_builder import write_tiny_gguf
from models_harness import (
    CPU,
    PROMPTS,
    Chunk,
    greedy_generate,
    make_kv_caches,
    run_ranks,
    run_step,
    thread_groups,
)
from test_cpu_fused_decode import _assert_steps_agree as assert_fused_steps_agree

pytestmark = pytest.mark.skipif(quant_library() is None, reason="no AVX2 CPU or C compiler here")


def _logits(loaded: LoadedModel) -> torch.Tensor:
    caches = make_kv_caches(loaded, 16)
    chunks = [Chunk(PROMPTS[0], 0, [0, 1]), Chunk(PROMPTS[1], 0, [2, 3, 4, 5, 6, 7])]
    return run_step(loaded.model, caches, chunks)


def _without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "kernels_available", lambda: False)


def _experts(loaded: LoadedModel) -> list[FusedMoE]:
    return [m for m in loaded.model.modules() if isinstance(m, FusedMoE)]


def _methods(loaded: LoadedModel) -> set[str]:
    return {type(m.method).__name__ for m in loaded.model.modules() if isinstance(m, MethodLayer)}


EXACT_WEIGHTS = 3e-3  # fraction of the largest logit
# Types whose code blocks hold the file's values bit for bit (no float16 rounding of scales or biases).
FILE_WEIGHTS = ("Q8_0", "Q4_0", "Q3_K", "MXFP4")
FILE_WEIGHTS_ERROR = 1e-3
REQUANTIZED_WEIGHTS = 0.03


def _assert_close_logits(ours: torch.Tensor, reference: torch.Tensor, fraction: float) -> None:
    tolerance = fraction * reference.abs().max()
    assert (ours - reference).abs().max() <= tolerance
    top2 = reference.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > tolerance
    assert torch.equal(ours.argmax(-1)[decided], reference.argmax(-1)[decided])


@pytest.mark.parametrize(
    ("qtype", "tied", "model_type"),
    [
        ("Q8_0", False, "llama"),
        ("Q4_0", True, "llama"),
        ("Q4_K", True, "llama"),
        ("Q6_K", False, "llama"),
        ("Q4_K", True, "gemma3_text"),
        ("Q4_0", True, "phi3"),
        ("Q8_0", False, "qwen3_moe"),  # expert stacks too (layers/moe_quantized.py)
        ("Q4_K", False, "qwen3_moe"),
        ("Q5_K", True, "llama"),  # 8-bit codes 0..31 and their biases
        ("Q5_K", False, "qwen3_moe"),
        ("Q3_K", True, "llama"),  # 8-bit codes of Q8_0's zero point, with the scale -d
        ("Q3_K", False, "qwen3_moe"),
        ("Q8_0", False, "mixtral"),  # Mixtral's expert stacks (w1, w3, w2) as well
        ("MXFP4", True, "llama"),  # 8-bit codes of Q8_0's zero point, scales 2^(e - 128)
        ("MXFP4", False, "qwen3_moe"),  # gpt-oss's expert format
    ],
)
def test_gguf_kernels_match_the_dequantized_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qtype: str, tied: bool, model_type: str
) -> None:
    overrides = {
        "gemma3_text": {"num_hidden_layers": 6, "sliding_window": 8},
        "phi3": {"pad_token_id": 0, "sliding_window": 6},  # fused q/k/v and gate/up rows
        "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256},
        "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None},
    }.get(model_type)
    model_dir = prepare_gguf_model_dir(
        write_tiny_gguf(tmp_path / "tiny.gguf", model_type, qtype, tied, overrides=overrides), tmp_path / "c"
    )
    quantized = load_model(model_dir, torch.float32, CPU, progress=False)
    # Every layer, Phi-3's fused q/k/v and gate/up (typed under their fused names) included.
    assert _methods(quantized) == {"CpuQuantizedLinearMethod"}
    assert all(experts.quantized is not None for experts in _experts(quantized))
    _without_kernels(monkeypatch)
    dequantized = load_model(model_dir, torch.float32, CPU, progress=False)
    assert "CpuQuantizedLinearMethod" not in _methods(dequantized)
    assert all(experts.quantized is None for experts in _experts(dequantized))
    fraction = {"Q6_K": REQUANTIZED_WEIGHTS, **dict.fromkeys(FILE_WEIGHTS, FILE_WEIGHTS_ERROR)}
    _assert_close_logits(_logits(quantized), _logits(dequantized), fraction.get(qtype, EXACT_WEIGHTS))


# Tensor-parallel ranks against one rank on the same weights: the activations' int8 rounding (see
# the top) turns float summation-order differences into steps of ~1e-5 of a block's largest value,
# ~1e-4 in these logprobs; requantizing a rank's K-quant share (as once done) moved them by 2e-2.
TP_LOGPROB_ATOL = 2e-3


@pytest.mark.parametrize(
    ("qtype", "tensor_types"),
    [
        ("Q4_K", None),
        ("Q6_K", None),
        ("Q4_K", {"attn_v.weight": "Q6_K", "ffn_down.weight": "Q6_K"}),
        ("Q5_K", {"attn_v.weight": "Q6_K", "ffn_down.weight": "Q6_K"}),  # a Q5_K_M file
        ("Q4_K", {"attn_v.weight": "Q5_K", "attn_output.weight": "Q5_K"}),  # 4- and 8-bit codes
        ("Q3_K", {"attn_v.weight": "Q5_K", "ffn_down.weight": "Q4_K"}),  # Q3_K_M-like
        ("IQ4_XS", None),  # 8-bit codes from the file's blocks
        ("IQ2_S", None),  # requantized to Q8_0 from the covering blocks' values
        ("IQ4_XS", {"attn_v.weight": "IQ3_S", "attn_output.weight": "IQ3_XXS"}),
    ],
)
def test_tensor_parallel_shares_inside_k_quant_blocks_are_exact(
    tmp_path: Path, qtype: str, tensor_types: dict[str, str] | None
) -> None:
    # o_proj's 256 inputs split in 128 per rank, inside the K-quants' 256-value super-blocks.
    model_dir = prepare_gguf_model_dir(
        write_tiny_gguf(tmp_path / "tiny.gguf", "llama", qtype, tensor_types=tensor_types), tmp_path / "c"
    )
    single = load_model(model_dir, torch.float32, CPU, progress=False)
    ranks = [load_model(model_dir, torch.float32, CPU, tp=g, progress=False) for g in thread_groups(2)]
    whole = single.model.get_submodule("model.layers.0.self_attn.o_proj")
    shares = [rank.model.get_submodule("model.layers.0.self_attn.o_proj") for rank in ranks]
    assert all(share.method is CPU_QUANTIZED for share in shares)
    # Each rank holds exactly its columns of the one-rank weight, in the same code width.
    whole_weight = store(whole).finish_whole()
    expected = dequantize_packed(whole_weight)
    for rank, share in enumerate(shares):
        packed = store(share).finish_whole()
        assert packed.bits == whole_weight.bits
        assert torch.equal(dequantize_packed(packed), expected[:, rank * 128 : (rank + 1) * 128])
    # So the ranks' partial products sum to the one-rank product up to float summation order.
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    summed = sum(
        share.method.apply(share, x[:, rank * 128 : (rank + 1) * 128], None)
        for rank, share in enumerate(shares)
    )
    full = whole.method.apply(whole, x, None)
    torch.testing.assert_close(summed, full, atol=1e-5 * float(full.abs().max()), rtol=0)
    tokens, logprobs = greedy_generate(single, PROMPTS[0], 8)
    for rank_tokens, rank_logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[0], 8), 2):
        assert rank_tokens == tokens
        torch.testing.assert_close(rank_logprobs, logprobs, atol=TP_LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize(
    ("qtype", "tensor_types"),
    [
        ("Q4_K", None),  # rank 1's experts start inside the 256-value super-blocks
        ("Q3_K", {"ffn_down_exps.weight": "Q6_K"}),  # 8-bit codes; Q6_K's down requantized per block
        ("Q8_0", None),
    ],
)
def test_tensor_parallel_experts_stay_quantized_as_their_shares(
    tmp_path: Path, qtype: str, tensor_types: dict[str, str] | None
) -> None:
    # Each expert's 256 intermediate values split in 128 per rank.
    overrides = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256}
    gguf = write_tiny_gguf(
        tmp_path / "tiny.gguf", "qwen3_moe", qtype, overrides=overrides, tensor_types=tensor_types
    )
    model_dir = prepare_gguf_model_dir(gguf, tmp_path / "c")
    single = load_model(model_dir, torch.float32, CPU, progress=False)
    ranks = [load_model(model_dir, torch.float32, CPU, tp=g, progress=False) for g in thread_groups(2)]
    whole = _experts(single)[0].quantized
    assert whole is not None
    for rank, loaded in enumerate(ranks):
        share = _experts(loaded)[0].quantized
        assert share is not None, "a rank's experts were dequantized"
        rows = slice(rank * 128, (rank + 1) * 128)
        for expert in range(8):
            gate_up = dequantize_packed(whole.gate_up[expert].finish_whole())
            expected = torch.cat([gate_up[:256][rows], gate_up[256:][rows]])
            assert torch.equal(dequantize_packed(share.gate_up[expert].finish_whole()), expected)
            down = dequantize_packed(whole.down[expert].finish_whole())
            assert torch.equal(dequantize_packed(share.down[expert].finish_whole()), down[:, rows])
    tokens, logprobs = greedy_generate(single, PROMPTS[0], 8)
    for rank_tokens, rank_logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[0], 8), 2):
        assert rank_tokens == tokens
        torch.testing.assert_close(rank_logprobs, logprobs, atol=TP_LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", "gpt_oss"])
def test_int8_quantizes_a_dense_checkpoint_at_load(tmp_path: Path, model_type: str) -> None:
    # The MoE models' experts too, where their sizes are whole blocks of 32 (gpt-oss's biased ones
    # expert by expert).
    overrides = {"moe_intermediate_size": 64} if model_type == "qwen3_moe" else None
    model_dir = write_random_model(tmp_path, model_type, overrides, seed=3)
    dense = load_model(model_dir, torch.float32, CPU, progress=False)
    int8 = load_model(model_dir, torch.float32, CPU, progress=False, quantization="int8")
    layers = [m for m in int8.model.modules() if isinstance(m, MethodLayer)]
    assert layers and all(m.method is CPU_QUANTIZED for m in layers)
    assert all(experts.quantized is not None for experts in _experts(int8))
    _assert_close_logits(_logits(int8), _logits(dense), REQUANTIZED_WEIGHTS)


def test_int8_quantizes_a_float_gguf_at_load(tmp_path: Path) -> None:
    model_dir = prepare_gguf_model_dir(
        write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "F16"), tmp_path / "c"
    )
    dense = load_model(model_dir, torch.float32, CPU, progress=False)
    assert "CpuQuantizedLinearMethod" not in _methods(dense)
    int8 = load_model(model_dir, torch.float32, CPU, progress=False, quantization="int8")
    assert _methods(int8) == {"CpuQuantizedLinearMethod"}
    _assert_close_logits(_logits(int8), _logits(dense), REQUANTIZED_WEIGHTS)


def test_int8_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    model_dir = write_random_model(tmp_path, "llama", seed=3)
    with pytest.raises(ValueError, match="random weights"):
        load_model(model_dir, torch.float32, CPU, random_weights=True, quantization="int8")
    with pytest.raises(ValueError, match="unknown quantization"):
        load_model(model_dir, torch.float32, CPU, quantization="nf4")


# Measured on three seeds each: 4-bit blocks of 32 moved these models' logits by 6.8-13.3% of the
# largest (llama, Qwen3-MoE) and 1.6-2.4% (gpt-oss); Q8_0 (--quantization fp8) by 0.2-0.9%.
FOUR_BIT_WEIGHTS = 0.2


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("quantization", ["w4a16", "fp8"])
def test_fp8_and_w4a16_quantize_a_dense_checkpoints_linears_on_the_cpu_kernels(
    tmp_path: Path, model_type: str, quantization: str
) -> None:
    # The linears and experts as asked; the embedding and LM head as Q8_0, as under int8.
    overrides = {"moe_intermediate_size": 64} if model_type == "qwen3_moe" else None
    model_dir = write_random_model(tmp_path, model_type, overrides, seed=3)
    dense = load_model(model_dir, torch.float32, CPU, progress=False)
    quantized = load_model(model_dir, torch.float32, CPU, progress=False, quantization=quantization)
    bits = 4 if quantization == "w4a16" else 8
    layers = {path: m for path, m in quantized.model.named_modules() if isinstance(m, MethodLayer)}
    for path, layer in layers.items():
        layer_bits = bits if layer.role == "linear" else 8
        assert layer.method is (CPU_QUANTIZED_4BIT if layer_bits == 4 else CPU_QUANTIZED), path
        packed = store(layer).finish()
        assert isinstance(packed, QuantizedWeight) and packed.bits == layer_bits, path
        # The blocks are those of the dense weight itself.
        weight = dense.model.get_submodule(path).weight.detach().numpy()
        expected = (from_dense_q4 if layer_bits == 4 else from_dense_q8)(weight)
        assert torch.equal(dequantize_packed(packed), torch.from_numpy(dequantize(expected))), path
    experts = _experts(quantized)
    assert all(e.quantized is not None and e.quantized.dense_bits == bits for e in experts)
    bound = FOUR_BIT_WEIGHTS if bits == 4 else REQUANTIZED_WEIGHTS
    _assert_close_logits(_logits(quantized), _logits(dense), bound)


@pytest.mark.skipif(stack_library() is None, reason="no AVX2 CPU or C compiler here")
def test_the_fused_decode_stack_steps_4_bit_blocks_made_at_load(tmp_path: Path) -> None:
    model_dir = write_random_model(tmp_path, "llama", seed=4)
    assert_fused_steps_agree(
        load_model(model_dir, torch.float32, CPU, progress=False, quantization="w4a16"), rows=3
    )


def test_w4a16_random_weights_on_the_cpu_kernels(tmp_path: Path) -> None:
    # Random linears are quantized after they are drawn; random experts stay dense stacks (the
    # kernels' blocks are filled only by loading).
    model_dir = write_random_model(tmp_path, "qwen3_moe", {"moe_intermediate_size": 64}, seed=5)
    loaded = load_model(
        model_dir, torch.float32, CPU, random_weights=True, quantization="w4a16", progress=False
    )
    linears = [m for m in loaded.model.modules() if isinstance(m, MethodLayer) and m.role == "linear"]
    assert linears and all(m.method is CPU_QUANTIZED_4BIT for m in linears)
    assert all(e.quantized is None for e in _experts(loaded))
    tokens, _ = greedy_generate(loaded, PROMPTS[0], 4)
    assert len(tokens) == 4


@pytest.mark.parametrize("quantization", ["fp8", "w4a16"])
def test_fp8_and_w4a16_warn_only_where_the_cpu_kernels_are_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, quantization: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="batchlm.models.load_checks"):
        check_quantization(quantization, CPU, random_weights=False)
        check_quantization(quantization, torch.device("cuda:0"), random_weights=False)
        assert not caplog.records
        _without_kernels(monkeypatch)
        check_quantization(quantization, CPU, random_weights=False)
    assert f"--quantization {quantization} runs on NVIDIA GPUs and x86-64 CPUs" in caplog.text
    assert "widen every weight at every step" in caplog.text


def test_w4a16_tensor_parallel_ranks_equal_one_rank(tmp_path: Path) -> None:
    # Row-parallel shares (o_proj's 64 and down_proj's 128 inputs over two ranks) quantize block by
    # block as the whole rows do: each rank's blocks are the single rank's.
    model_dir = write_random_model(tmp_path, "llama", seed=6)
    single = load_model(model_dir, torch.float32, CPU, progress=False, quantization="w4a16")
    ranks = [
        load_model(model_dir, torch.float32, CPU, tp=g, progress=False, quantization="w4a16")
        for g in thread_groups(2)
    ]
    down = single.model.get_submodule("model.layers.0.mlp.down_proj")
    shares = [rank.model.get_submodule("model.layers.0.mlp.down_proj") for rank in ranks]
    whole = dequantize_packed(store(down).finish())
    assert torch.equal(torch.cat([dequantize_packed(store(s).finish()) for s in shares], dim=1), whole)
    tokens, logprobs = greedy_generate(single, PROMPTS[0], 6)
    for rank_tokens, rank_logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[0], 6), 2):
        assert rank_tokens == tokens
        torch.testing.assert_close(rank_logprobs, logprobs, atol=TP_LOGPROB_ATOL, rtol=0)
