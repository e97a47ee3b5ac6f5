"""GLM-4 against transformers: partial RoPE over interleaved pairs (served as rotate-half over q/k rows
reordered at load, in every weight form and after a LoRA merge), norms of the attention's and the
MLP's outputs, q/k/v biases and the fused gate/up; batching, tensor parallelism and GGUF files as
llama.cpp writes them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from transformers import AutoModelForCausalLM
from transformers.models.glm4.modeling_glm4 import Glm4RotaryEmbedding, apply_rotary_pos_emb

from batchlm.layers.quantization.base import LoadedWeight, QuantizedTensor, as_dense
from batchlm.layers.quantization.forms import Int4Weight, quantize_fp8_rows
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.glm4 import Glm4ForCausalLM, halves_order, pairs_as_halves
from batchlm.models.random_model import write_random_model
from gguf_builder import write_dequantized_copy, write_tiny_gguf
from lora_harness import ALPHA, RANK, write_adapter
from models_harness import (
    LOGPROB_ATOL,
    PROMPTS,
    assert_greedy_matches_hf,
    assert_mixed_batch_matches_requests_alone,
    greedy_generate,
    load_fp32_cpu,
    run_ranks,
    thread_groups,
)

NEW_TOKENS = 20
# Glm4Config's pad_token_id (151329) lies outside the tiny vocabulary.
GLM4 = {"pad_token_id": 0}
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16  # the tiny model's (random_model.TINY_CONFIG)
Q8_0 = GGMLQuantizationType.Q8_0


def assert_matches_transformers(loaded_dir: Path, hf_dir: Path) -> None:
    loaded = load_fp32_cpu(loaded_dir)
    assert isinstance(loaded.model, Glm4ForCausalLM)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_matches_transformers(tmp_path: Path, tied: bool) -> None:
    path = write_random_model(tmp_path, "glm4", {**GLM4, "tie_word_embeddings": tied}, seed=71)
    # Glm4Config's default: half of each head rotates.
    assert {layer.rope.rotary_dim for layer in load_fp32_cpu(path).config.layers} == {HEAD_DIM // 2}
    assert_matches_transformers(path, path)


@torch.no_grad()
@pytest.mark.parametrize("partial", [0.5, 1.0])
def test_reordered_rows_rotate_as_transformers_pairs_them(tmp_path: Path, partial: float) -> None:
    # transformers turns pairs (2i, 2i + 1) of the leading dimensions; batchlm turns (i, i + r/2) of
    # rows reordered by halves_order. The same values, in that order.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial}
    path = write_random_model(tmp_path, "glm4", {**GLM4, "rope_parameters": rope}, seed=72)
    loaded = load_fp32_cpu(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    positions = torch.tensor([0, 1, 5, 37, 300])
    q, k = torch.randn(5, HEADS, HEAD_DIM), torch.randn(5, KV_HEADS, HEAD_DIM)
    cos, sin = Glm4RotaryEmbedding(hf.config)(q, positions.unsqueeze(0))
    theirs_q, theirs_k = apply_rotary_pos_emb(q.transpose(0, 1), k.transpose(0, 1), cos[0], sin[0], 0)
    order = halves_order(1, HEAD_DIM, int(HEAD_DIM * partial))
    ours_q, ours_k = loaded.model.model.layers[0].self_attn.rotary_emb(
        positions, q[..., order], k[..., order]
    )
    torch.testing.assert_close(ours_q, theirs_q.transpose(0, 1)[..., order], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_k, theirs_k.transpose(0, 1)[..., order], atol=1e-6, rtol=0)


def test_halves_order_moves_each_heads_pairs_and_keeps_the_rest() -> None:
    assert halves_order(2, 6, 4).tolist() == [0, 2, 1, 3, 4, 5, 6, 8, 7, 9, 10, 11]


@pytest.mark.parametrize("form", ["dense", "gguf-q8_0", "fp8", "int4"])
def test_every_weight_form_moves_its_rows_whole(tmp_path: Path, form: str) -> None:
    # Quantized checkpoints and GGUF files hand q/k over as row-wise forms: each reordered row keeps
    # its bytes and its scales, so the result dequantizes to the reordered rows of the original.
    config = load_fp32_cpu(write_random_model(tmp_path, "glm4", GLM4, seed=73)).config
    rows = HEADS * HEAD_DIM
    dense = torch.randn(rows, 64)
    forms: dict[str, LoadedWeight] = {
        "dense": dense,
        "gguf-q8_0": QuantizedTensor("Q8_0", torch.from_numpy(quantize(dense.numpy(), Q8_0)), 64, 32, 34),
        "fp8": replace(quantize_fp8_rows(dense), input_scale=0.5),
        "int4": Int4Weight(
            torch.randint(0, 16, (rows, 64), dtype=torch.uint8),
            torch.rand(rows, 2),
            torch.randint(0, 16, (rows, 2), dtype=torch.uint8),
            32,
        ),
    }
    weight = forms[form]
    [(_, moved)] = pairs_as_halves([("model.layers.0.self_attn.q_proj.weight", weight)], config)
    assert type(moved) is type(weight)
    assert getattr(moved, "input_scale", None) == getattr(weight, "input_scale", None)
    order = halves_order(HEADS, HEAD_DIM, HEAD_DIM // 2)
    assert torch.equal(as_dense(moved, torch.float32), as_dense(weight, torch.float32)[order])


def test_lora_deltas_merge_before_the_rows_move(tmp_path: Path) -> None:
    # PEFT's deltas are in transformers' layout (q/k pairs interleaved, gate and up fused): merged into
    # the checkpoint's tensors, which are then reordered and split.
    base = write_random_model(tmp_path / "base", "glm4", GLM4, seed=74)
    targets = {
        "model.layers.0.self_attn.q_proj": (HEADS * HEAD_DIM, 64),
        "model.layers.1.self_attn.k_proj": (KV_HEADS * HEAD_DIM, 64),
        "model.layers.1.mlp.gate_up_proj": (2 * 128, 64),
    }
    pairs = write_adapter(tmp_path / "adapter", targets)
    adapted = load_fp32_cpu(base, adapter_path=str(tmp_path / "adapter"))
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            hf.get_submodule(module).weight += ALPHA / RANK * b @ a
    assert_greedy_matches_hf(adapted, hf, PROMPTS, 12)


def test_mixed_batch_matches_requests_run_alone(tmp_path: Path) -> None:
    assert_mixed_batch_matches_requests_alone(
        load_fp32_cpu(write_random_model(tmp_path, "glm4", GLM4, seed=75))
    )


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-heads-split", "kv-head-replicated"])
def test_tensor_parallel_two_ranks_match_single_rank(tmp_path: Path, kv_heads: int) -> None:
    # Each rank's heads keep their reordered rows (the order never crosses a head).
    path = write_random_model(tmp_path, "glm4", {**GLM4, "num_key_value_heads": kv_heads}, seed=76)
    single = load_fp32_cpu(path)
    ranks = [load_fp32_cpu(path, tp=group) for group in thread_groups(2)]
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[1], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[1], 8), 2):
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_file_matches_transformers(tmp_path: Path, qtype: str) -> None:
    # As llama.cpp writes a glm4 file: q/k rows as HF interleaves them (its RoPE pairs neighbours),
    # rope.dimension_count half a head, gate/up fused in ffn_up, the output norms as post_attention_norm
    # and post_ffw_norm. Q8_0 is compared with the same file dequantized (transformers reads no glm4
    # file).
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "glm4", qtype, overrides=GLM4, seed=77)
    model_dir = prepare_gguf_model_dir(gguf_path, tmp_path / "cache")
    loaded = load_fp32_cpu(model_dir)
    assert loaded.config.attention_bias and loaded.config.layers[0].rope.rotary_dim == 32
    if qtype == "F32":
        assert_matches_transformers(model_dir, tmp_path / "hf")
        return
    (tmp_path / "deq").mkdir()
    dequantized = write_dequantized_copy(gguf_path, tmp_path / "deq" / "tiny.gguf")
    reference = load_fp32_cpu(prepare_gguf_model_dir(dequantized, tmp_path / "deq-cache"))
    for prompt in PROMPTS:
        ours, our_logprobs = greedy_generate(loaded, prompt, NEW_TOKENS)
        theirs, their_logprobs = greedy_generate(reference, prompt, NEW_TOKENS)
        assert ours == theirs
        torch.testing.assert_close(our_logprobs, their_logprobs, atol=LOGPROB_ATOL, rtol=0)
