"""Granite 3.x dense against transformers: the embedding, residual and attention multipliers and the
logits divisor applied where (and rounded as) transformers applies them; batching and TP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.models.granite import GraniteDecoderLayer, GraniteForCausalLM
from batchlm.models.loader import load_model
from batchlm.models.random_model import write_random_model
from models_harness import (
    CPU,
    PROMPTS,
    Chunk,
    assert_greedy_matches_hf,
    assert_mixed_batch_matches_requests_alone,
    build_step,
    greedy_generate,
    load_fp32_cpu,
    make_kv_caches,
    run_ranks,
    run_step,
    thread_groups,
)

NEW_TOKENS = 20
# granite-3.3-8b-instruct's embedding and residual multipliers; an attention scale other than
# 1/sqrt(head_dim) (its 1/128 is that of its 128-wide heads), and a logits divisor that widens the
# tiny model's logits (its 16 would leave them near zero, where a tolerance says little).
GRANITE: dict[str, Any] = {
    "embedding_multiplier": 12.0,
    "residual_multiplier": 0.22,
    "attention_multiplier": 0.5,
    "logits_scaling": 0.25,
}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_matches_transformers(tmp_path: Path, tied: bool) -> None:
    path = write_random_model(tmp_path, "granite", {**GRANITE, "tie_word_embeddings": tied}, seed=41)
    loaded = load_fp32_cpu(path)
    assert isinstance(loaded.model, GraniteForCausalLM)
    assert {layer.self_attn.spec.scale for layer in loaded.model.model.layers} == {0.5}
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("name", ["embedding_multiplier", "residual_multiplier", "logits_scaling"])
def test_each_multiplier_changes_the_logits(tmp_path: Path, name: str) -> None:
    # Against a twin with that one field at 1: each is read and applied. (The attention scale is each
    # layer's spec, asserted above: a tiny random model's scores are too small for it to show here.)
    scaled = load_fp32_cpu(write_random_model(tmp_path / "a", "granite", GRANITE, seed=42))
    plain = load_fp32_cpu(write_random_model(tmp_path / "b", "granite", {**GRANITE, name: 1.0}, seed=42))
    chunk = [Chunk(PROMPTS[0], 0, [0, 1])]
    a = run_step(scaled.model, make_kv_caches(scaled, 2), chunk)
    b = run_step(plain.model, make_kv_caches(plain, 2), chunk)
    assert (a - b).abs().max() > 1e-2 * a.abs().max()


@torch.no_grad()
def test_bfloat16_rounds_as_transformers_does(tmp_path: Path) -> None:
    # Each multiplier is its own operation in the activations' dtype, as in transformers: one layer,
    # the embedding and the logits give transformers' very bits in bfloat16.
    path = write_random_model(tmp_path, "granite", GRANITE, seed=43)
    loaded = load_model(path, torch.bfloat16, CPU, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor(PROMPTS[1])
    embedded = loaded.model.model.embed(ids)
    assert torch.equal(embedded, hf.model.embed_tokens(ids) * GRANITE["embedding_multiplier"])
    hidden = torch.randn(3, 64).to(torch.bfloat16)
    assert torch.equal(loaded.model.compute_logits(hidden), hf.lm_head(hidden) / GRANITE["logits_scaling"])
    # A whole layer (attention over the prompt, both residual adds): the MLP output it returns joins
    # the residual stream in the next norm, as transformers' layer output is that sum.
    layer = loaded.model.model.layers[0]
    assert isinstance(layer, GraniteDecoderLayer)
    _, positions, meta = build_step([Chunk(list(range(len(ids))), 0, list(range(8)))])
    cache = make_kv_caches(loaded, 8)[0]
    out, residual = layer(positions, embedded, None, cache, meta, TorchAttentionBackend())
    theirs = _hf_layer(hf, embedded)
    torch.testing.assert_close(out + residual, theirs, atol=0, rtol=0)


def _hf_layer(hf: Any, hidden: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(hidden.shape[0]).unsqueeze(0)
    cos_sin = hf.model.rotary_emb(hidden.unsqueeze(0), positions)
    mask = torch.full((hidden.shape[0],) * 2, float("-inf")).triu(1)[None, None].to(hidden.dtype)
    out = hf.model.layers[0](hidden.unsqueeze(0), attention_mask=mask, position_ids=positions,
                             position_embeddings=cos_sin)  # fmt: skip
    return (out[0] if isinstance(out, tuple) else out)[0]


def test_mixed_batch_matches_requests_run_alone(tmp_path: Path) -> None:
    loaded = load_fp32_cpu(write_random_model(tmp_path, "granite", GRANITE, seed=44))
    assert_mixed_batch_matches_requests_alone(loaded)


def test_tensor_parallel_two_ranks_match_single_rank(tmp_path: Path) -> None:
    path = write_random_model(tmp_path, "granite", GRANITE, seed=45)
    single = load_fp32_cpu(path)
    ranks = [load_fp32_cpu(path, tp=group) for group in thread_groups(2)]
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[0], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[0], 8), 2):
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)


def test_gguf_file_matches_transformers(tmp_path: Path) -> None:
    # As llama.cpp writes a granite file: q/k rows permuted as Llama's, the multipliers as metadata.
    from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
    from gguf_builder import write_tiny_gguf

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "granite", "F32", overrides=GRANITE, seed=46)
    loaded = load_fp32_cpu(prepare_gguf_model_dir(gguf_path, tmp_path / "cache"))
    assert isinstance(loaded.model, GraniteForCausalLM)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)


def test_a_gguf_file_without_the_multipliers_is_refused(tmp_path: Path) -> None:
    from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
    from gguf_builder import write_dequantized_copy, write_tiny_gguf

    complete = write_tiny_gguf(tmp_path / "tiny.gguf", "granite", "F32", overrides=GRANITE, seed=47)
    lacking = write_dequantized_copy(complete, tmp_path / "lacking.gguf", ("granite.residual_scale",))
    with pytest.raises(ValueError, match=r"lacks 'granite\.residual_scale'"):
        prepare_gguf_model_dir(lacking, tmp_path / "cache")
