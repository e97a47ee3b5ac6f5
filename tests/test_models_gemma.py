"""Gemma 2 and Gemma 3 (text) against transformers: greedy tokens and logprobs, with contexts longer
than the sliding window, soft-caps, q/k norms and local RoPE bases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchlm.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from batchlm.models.loader import LoadedModel, load_model
from batchlm.models.random_model import TINY_CONFIG, write_random_model
from models_harness import (
    CPU,
    PROMPTS,
    Chunk,
    assert_greedy_matches_hf,
    greedy_generate,
    hf_gemma3_multimodal,
    make_kv_caches,
    run_ranks,
    run_step,
    thread_groups,
)

NEW_TOKENS = 16
# The second prompt alone outgrows the window; generation takes the first one past it too.
WINDOW = 6
LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]

GEMMA2: dict[str, Any] = {"num_hidden_layers": 3, "layer_types": LAYERS, "sliding_window": WINDOW,
                          "query_pre_attn_scalar": 24, "attn_logit_softcapping": 5.0,
                          "final_logit_softcapping": 3.0, "pad_token_id": 0}  # fmt: skip
GEMMA3: dict[str, Any] = {"num_hidden_layers": 3, "layer_types": LAYERS, "sliding_window": WINDOW,
                          "query_pre_attn_scalar": 24, "pad_token_id": 0,
                          "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                              "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}}  # fmt: skip
FAMILIES = [("gemma2", GEMMA2, Gemma2ForCausalLM), ("gemma3_text", GEMMA3, Gemma3ForCausalLM)]


def load(path: Path) -> LoadedModel:
    return load_model(path, torch.float32, CPU, progress=False)


# Gemma 3 4B+: the global layers' RoPE is linearly scaled, the local ones' is not.
LINEAR_GLOBAL = {**GEMMA3, "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}}  # fmt: skip


# transformers' Gemma 3 keeps a stated attn_logit_softcapping but never applies it.
STATED_ATTN_CAP = {**GEMMA3, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 6.0}


@pytest.mark.parametrize(
    ("model_type", "overrides", "model_class"),
    [
        *FAMILIES,
        ("gemma3_text", LINEAR_GLOBAL, Gemma3ForCausalLM),
        ("gemma3_text", STATED_ATTN_CAP, Gemma3ForCausalLM),
    ],
    ids=["gemma2", "gemma3", "gemma3-linear-global", "gemma3-stated-attn-cap"],
)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_greedy_matches_transformers_past_the_window(
    tmp_path: Path, model_type: str, overrides: dict[str, Any], model_class: type, tied: bool
) -> None:
    path = write_random_model(tmp_path, model_type, {**overrides, "tie_word_embeddings": tied}, seed=11)
    loaded = load(path)
    assert isinstance(loaded.model, model_class)
    assert loaded.shape.max_model_len == 512  # the window is no context cap
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize(
    ("model_type", "overrides"), [(t, o) for t, o, _ in FAMILIES], ids=["gemma2", "gemma3"]
)
def test_the_window_matters(tmp_path: Path, model_type: str, overrides: dict[str, Any]) -> None:
    # Against a twin whose window layers see everything: equal inside the window, different past it.
    windowed = load(write_random_model(tmp_path / "w", model_type, overrides, seed=12))
    wide = load(write_random_model(tmp_path / "f", model_type, {**overrides, "sliding_window": 512}, seed=12))
    short, long = PROMPTS[0][:WINDOW], PROMPTS[1]
    for prompt, same in ((short, True), (long, False)):
        chunk = [Chunk(prompt, 0, list(range(8)))]
        a = run_step(windowed.model, make_kv_caches(windowed, 8), chunk)
        b = run_step(wide.model, make_kv_caches(wide, 8), chunk)
        assert torch.allclose(a, b, atol=1e-5) == same


@pytest.mark.parametrize(
    ("model_type", "overrides"), [(t, o) for t, o, _ in FAMILIES], ids=["gemma2", "gemma3"]
)
def test_bidirectional_attention_is_refused(
    tmp_path: Path, model_type: str, overrides: dict[str, Any]
) -> None:
    path = write_random_model(
        tmp_path, model_type, {**overrides, "use_bidirectional_attention": True}, seed=16
    )
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        load(path)


def test_final_logits_are_soft_capped(tmp_path: Path) -> None:
    loaded = load(write_random_model(tmp_path, "gemma2", GEMMA2, seed=13))
    logits = run_step(loaded.model, make_kv_caches(loaded, 8), [Chunk(PROMPTS[0], 0, list(range(8)))])
    assert float(logits.abs().max()) < GEMMA2["final_logit_softcapping"]


@pytest.mark.parametrize(
    ("model_type", "overrides"), [(t, o) for t, o, _ in FAMILIES], ids=["gemma2", "gemma3"]
)
def test_tensor_parallel_two_ranks_match_single_rank(
    tmp_path: Path, model_type: str, overrides: dict[str, Any]
) -> None:
    path = write_random_model(tmp_path, model_type, overrides, seed=14)
    single = load(path)
    ranks = [load_model(path, torch.float32, CPU, progress=False, tp=group) for group in thread_groups(2)]
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[1], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[1], 8), 2):
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)


def test_multimodal_checkpoint_serves_its_text_model(tmp_path: Path) -> None:
    from batchlm.models.gemma import Gemma3ForConditionalGeneration as Ours

    text = {k: v for k, v in {**TINY_CONFIG, **GEMMA3}.items() if k != "tie_word_embeddings"}
    hf = hf_gemma3_multimodal(text, seed=15)
    hf.save_pretrained(tmp_path)  # language_model.*, vision_tower.*, multi_modal_projector.* tensors
    loaded = load(tmp_path)
    assert isinstance(loaded.model, Ours)
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)
