"""gpt-oss's released form: quantization_config quant_method "mxfp4", each layer's experts as MXFP4
`_blocks` / `_scales` pairs (gate/up rows interleaved) beside bf16 biases and other weights. Against
transformers' GptOssForCausalLM on the same weights dequantized by its own convert_moe_packed_tensors:
the experts dense (the kernels turned off here) match its greedy tokens and logprobs
tightly; kept as blocks on the quantized CPU kernels, its logits within the kernels' activation
rounding (tests/test_cpu_quantized_model.py) and its greedy tokens. Pairs split across shards, in
either order, load alike; a pair without its partner is refused by name."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from batchlm.kernels.cpu_quant import quant_library
from batchlm.kernels.quant_panels import QuantizedWeight
from batchlm.layers.moe import FusedMoE
from batchlm.layers.quantization import registry
from batchlm.layers.quantization.cpu_quantized import CPU_QUANTIZED
from batchlm.layers.quantization.layer import MethodLayer
from batchlm.models import loader
from batchlm.models.load_checks import mxfp4_experts_summary
from batchlm.models.loader import LoadedModel
from batchlm.models.random_model import write_random_model
from models_harness import (
    BLOCK_SIZE,
    PROMPTS,
    Chunk,
    assert_greedy_matches_hf,
    greedy_generate,
    hf_greedy,
    hf_reference_model,
    load_fp32_cpu,
    make_kv_caches,
    run_ranks,
    run_step,
    thread_groups,
)

NEW_TOKENS = 12
# As tests/test_models_gpt_oss.py: a 4-token window and a SwiGLU limit the tiny experts reach.
WINDOW = {"sliding_window": 4, "swiglu_limit": 0.1}
QUANTIZATION = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
# Exponent bytes of the random scales: powers 2^-8..2^-5, weights up to 6 * 2^-5 (all on the kernels'
# exact 8-bit codes, which take 104..136).
EXPONENTS = (119, 123)
STACKS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
# The kernels round activations to int8 (see tests/test_cpu_quantized_model.py): logits within this
# fraction of the largest, logprobs within QUANTIZED_LOGPROB_ATOL (measured: 2e-5 and 1.2e-5).
QUANTIZED_LOGITS = 1e-3
QUANTIZED_LOGPROB_ATOL = 1e-3

needs_kernels = pytest.mark.skipif(quant_library() is None, reason="no AVX2 CPU or C compiler here")


def _mxfp4_pair(stack: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks and scales of a transformers stack's shape ([E, in, out]: blocks [E, out, in / 32,
    16], scales [E, out, in / 32])."""
    experts, inputs, outputs = stack.shape
    blocks = torch.randint(
        0, 256, (experts, outputs, inputs // 32, 16), generator=generator, dtype=torch.uint8
    )
    low, high = EXPONENTS
    scales = torch.randint(low, high + 1, (experts, outputs, inputs // 32), generator=generator)
    return blocks, scales.to(torch.uint8)


def _write_checkpoints(tmp_path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The MXFP4 checkpoint's tensors, and a dense checkpoint of the same weights (experts dequantized
    by transformers, the rest the same bf16) for transformers to load."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    dense_dir = write_random_model(tmp_path / "dense", "gpt_oss", WINDOW, seed=3)
    generator = torch.Generator().manual_seed(5)
    mxfp4: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(dense_dir / "model.safetensors").items():
        if name.endswith(STACKS):
            blocks, scales = _mxfp4_pair(tensor, generator)
            mxfp4[f"{name}_blocks"], mxfp4[f"{name}_scales"] = blocks, scales
            dense[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            assert dense[name].shape == tensor.shape
        else:
            mxfp4[name] = dense[name] = tensor.to(torch.bfloat16)
    save_file(dense, dense_dir / "model.safetensors", metadata={"format": "pt"})
    return mxfp4, dense_dir


def _mxfp4_dir(out: Path, dense_dir: Path, tensors: dict[str, torch.Tensor], shards: int) -> Path:
    """An MXFP4 checkpoint directory: one file, or two with the gate/up scales and the down blocks in
    the first (scales before their blocks, and blocks before theirs)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    config = json.loads((dense_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": QUANTIZATION}))
    if shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return out
    first = {n for n in tensors if n.endswith(("gate_up_proj_scales", "down_proj_blocks"))}
    files = {
        "model-00001-of-00002.safetensors": first,
        "model-00002-of-00002.safetensors": set(tensors) - first,
    }
    for file, names in files.items():
        save_file({n: tensors[n] for n in names}, out / file, metadata={"format": "pt"})
    weight_map = {name: file for file, names in files.items() for name in names}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], Path, Path]:
    tmp_path = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    tensors, dense_dir = _write_checkpoints(tmp_path)
    return tensors, dense_dir, tmp_path


def _experts(loaded: LoadedModel) -> list[FusedMoE]:
    return [m for m in loaded.model.modules() if isinstance(m, FusedMoE)]


@pytest.mark.parametrize("shards", [1, 2])
def test_dense_experts_match_transformers(
    checkpoints: tuple[dict[str, torch.Tensor], Path, Path], monkeypatch: pytest.MonkeyPatch, shards: int
) -> None:
    """Off the quantized CPU kernels the experts load dense, dequantized as they arrive."""
    tensors, dense_dir, tmp_path = checkpoints
    monkeypatch.setattr(registry, "kernels_available", lambda: False)
    loaded = load_fp32_cpu(_mxfp4_dir(tmp_path / f"dense-{shards}", dense_dir, tensors, shards))
    assert all(experts.quantized is None for experts in _experts(loaded))
    assert_greedy_matches_hf(loaded, hf_reference_model(dense_dir), PROMPTS, NEW_TOKENS)


@needs_kernels
@pytest.mark.parametrize("shards", [1, 2])
def test_quantized_experts_match_transformers(
    checkpoints: tuple[dict[str, torch.Tensor], Path, Path], caplog: pytest.LogCaptureFixture, shards: int
) -> None:
    """With no --quantization the experts stay MXFP4 blocks on the CPU kernels (every layer's experts in
    one call of the fused experts kernel, biases and clamped SwiGLU included); logits and greedy tokens
    as transformers' on the dequantized weights."""
    tensors, dense_dir, tmp_path = checkpoints
    with caplog.at_level(logging.INFO, logger=loader.__name__):
        loaded = load_fp32_cpu(_mxfp4_dir(tmp_path / f"quantized-{shards}", dense_dir, tensors, shards))
    assert "experts kept as MXFP4 blocks on the quantized CPU kernels" in caplog.text
    experts = _experts(loaded)
    assert experts and all(e.quantized is not None and e.quantized.kernel is not None for e in experts)
    assert all(e.gate_up_proj.numel() == 0 for e in experts)  # no dense stacks beside the blocks
    # Each expert's projections stay 4-bit indices into the MXFP4 code table (table panels).
    packed = [store.finish() for e in experts for store in (*e.quantized.gate_up, *e.quantized.down)]
    assert all(isinstance(w, QuantizedWeight) and w.bits == 4 and w.table for w in packed)
    hf_model = hf_reference_model(dense_dir)
    prompt = PROMPTS[1]
    blocks = list(range(-(-len(prompt) // BLOCK_SIZE)))
    ours = run_step(loaded.model, make_kv_caches(loaded, len(blocks)), [Chunk(prompt, 0, blocks)])
    with torch.no_grad():
        theirs = hf_model(torch.tensor([prompt])).logits[0, -1:]
    assert (ours - theirs).abs().max() <= QUANTIZED_LOGITS * theirs.abs().max()
    for prompt in PROMPTS:
        our_tokens, our_logprobs = greedy_generate(loaded, prompt, NEW_TOKENS)
        their_tokens, their_logprobs = hf_greedy(hf_model, prompt, NEW_TOKENS)
        assert our_tokens == their_tokens
        torch.testing.assert_close(our_logprobs, their_logprobs, atol=QUANTIZED_LOGPROB_ATOL, rtol=0)


@needs_kernels
def test_tensor_parallel_ranks_keep_their_share_of_the_blocks(
    checkpoints: tuple[dict[str, torch.Tensor], Path, Path],
) -> None:
    """Two ranks, each with half of every expert's gate/up rows and down columns (one 32-value block
    each), give one rank's tokens; logprobs within the kernels' rounding of a different sum order."""
    tensors, dense_dir, tmp_path = checkpoints
    path = _mxfp4_dir(tmp_path / "tp", dense_dir, tensors, 2)
    single = load_fp32_cpu(path)
    ranks = [load_fp32_cpu(path, tp=group) for group in thread_groups(2)]
    assert all(e.quantized is not None and e.inter_per_rank == 32 for e in _experts(ranks[1]))
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[1], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[1], 8), 2):
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=QUANTIZED_LOGPROB_ATOL, rtol=0)


def test_another_family_with_an_mxfp4_config_is_refused_by_name(tmp_path: Path) -> None:
    path = write_random_model(tmp_path, "qwen3_moe")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": QUANTIZATION}))
    with pytest.raises(
        ValueError, match="'mxfp4' holds gpt-oss's experts; Qwen3MoeForCausalLM does not load it"
    ):
        load_fp32_cpu(path)


@pytest.mark.parametrize("half", ["blocks", "scales"])
def test_a_pair_without_its_partner_is_refused_by_name(
    checkpoints: tuple[dict[str, torch.Tensor], Path, Path], half: str
) -> None:
    tensors, dense_dir, tmp_path = checkpoints
    dropped = f"model.layers.1.mlp.experts.down_proj_{half}"
    kept = {name: tensor for name, tensor in tensors.items() if name != dropped}
    path = _mxfp4_dir(tmp_path / f"without-{half}", dense_dir, kept, 1)
    kept_half = "scales" if half == "blocks" else "blocks"
    with pytest.raises(
        ValueError, match=f"has model.layers.1.mlp.experts.down_proj_{kept_half} but no {dropped}"
    ):
        load_fp32_cpu(path)


@needs_kernels
def test_int8_on_an_mxfp4_checkpoint_takes_its_dense_layers_only(
    checkpoints: tuple[dict[str, torch.Tensor], Path, Path],
) -> None:
    # The experts stay MXFP4 blocks; the attention, embedding and LM head the checkpoint left bf16
    # become Q8_0.
    tensors, dense_dir, tmp_path = checkpoints
    path = _mxfp4_dir(tmp_path / "int8", dense_dir, tensors, 1)
    plain, int8 = load_fp32_cpu(path), load_fp32_cpu(path, quantization="int8")
    packed = [store.finish() for e in _experts(int8) for store in (*e.quantized.gate_up, *e.quantized.down)]
    assert packed and all(isinstance(w, QuantizedWeight) and w.bits == 4 and w.table for w in packed)
    layers = [m for m in int8.model.modules() if isinstance(m, MethodLayer)]
    assert layers and all(m.method is CPU_QUANTIZED for m in layers)
    assert all(m.method is not CPU_QUANTIZED for m in plain.model.modules() if isinstance(m, MethodLayer))
    prompt = PROMPTS[1]
    blocks = list(range(-(-len(prompt) // BLOCK_SIZE)))
    ours = run_step(int8.model, make_kv_caches(int8, len(blocks)), [Chunk(prompt, 0, blocks)])
    theirs = run_step(plain.model, make_kv_caches(plain, len(blocks)), [Chunk(prompt, 0, blocks)])
    # Q8_0 of the dense layers (the int8 tests' bound for requantized weights).
    assert (ours - theirs).abs().max() <= 0.03 * theirs.abs().max()


def test_the_load_log_says_where_the_experts_run() -> None:
    """On a GPU the experts stay MXFP4 stacks (tests/test_moe_mxfp4.py); where they cannot, dense."""
    from collections import Counter

    on_gpu = mxfp4_experts_summary(Counter({"MXFP4 experts": 2}), torch.bfloat16, torch.device("cuda:0"))
    assert on_gpu == (
        "experts kept as MXFP4 stacks on cuda:0 (widened to bfloat16 as the grouped GEMM reads them); "
        "other weights dense bfloat16"
    )
    dense = mxfp4_experts_summary(Counter(), torch.bfloat16, torch.device("cuda:0"))
    assert dense.startswith("experts dequantized to dense bfloat16 on cuda:0 (MXFP4 stacks need")
    on_kernels = mxfp4_experts_summary(Counter({"quantized experts": 2}), torch.float32, torch.device("cpu"))
    assert on_kernels.startswith("experts kept as MXFP4 blocks on the quantized CPU kernels")
