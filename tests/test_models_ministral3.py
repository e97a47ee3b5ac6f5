"""Ministral 3 against transformers, as Ministral3ForCausalLM and as the text model of a
Mistral3ForConditionalGeneration checkpoint: queries scaled by 1 + beta * log(1 + floor(p / L)) over
YaRN, with L (original_max_position_embeddings) short enough that the prompts reach several blocks;
every attention backend gets the scaled queries; batching and TP; configs refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm.attention.backend import AttentionMetadata, AttentionSpec, QueryKeyRotation
from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.models.loader import LoadedModel
from batchlm.models.ministral3 import Ministral3Attention, Ministral3ForCausalLM, QueryScaling
from batchlm.models.mistral3 import Mistral3ForConditionalGeneration
from batchlm.models.random_model import write_random_model
from models_harness import (
    PROMPTS,
    Chunk,
    assert_greedy_matches_hf,
    assert_mixed_batch_matches_requests_alone,
    build_step,
    greedy_generate,
    hf_reference_model,
    load_fp32_cpu,
    make_kv_caches,
    run_ranks,
    run_step,
    thread_groups,
)
from test_models_mistral3 import edit_config, in_transformers_5_layout

NEW_TOKENS = 16
ORIGINAL_LENGTH = 16


def ministral3_rope(original_length: int = ORIGINAL_LENGTH, beta: float = 1.0) -> dict[str, Any]:
    """The published configs' YaRN and query scaling (theirs: 16,384 tokens stretched 16x, beta 0.1)
    over `original_length` tokens stretched to the tiny config's 512: the prompts cross several of
    its blocks. A beta of 1 makes the scale, and so a wrong one, show in a random model's logits."""
    return {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 512 / original_length,
        "original_max_position_embeddings": original_length,
        "max_position_embeddings": 512,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": beta,
    }


# Weights at 2.5x the tiny default's spread: attention scores large enough that a missing or misplaced
# query scale changes most greedy tokens (at the default it moves the logits by ~1%).
MINISTRAL3: dict[str, Any] = {"rope_parameters": ministral3_rope(), "initializer_range": 0.05}
# The multimodal checkpoint: a Mistral 3 whose text_config is Ministral 3's.
MULTIMODAL: dict[str, Any] = {"text_model_type": "ministral3", **MINISTRAL3}


def write_model(path: Path, multimodal: bool, overrides: dict[str, Any] | None = None, seed: int = 0) -> Path:
    if multimodal:
        return write_random_model(path, "mistral3", {**MULTIMODAL, **(overrides or {})}, seed)
    return write_random_model(path, "ministral3", {**MINISTRAL3, **(overrides or {})}, seed)


def assert_matches_transformers(loaded: LoadedModel, model_dir: Path) -> None:
    hf = hf_reference_model(model_dir)
    # Both prompts run past ORIGINAL_LENGTH (the second reaches its third block), so most positions
    # have a factor above 1.
    assert all(len(prompt) + NEW_TOKENS > ORIGINAL_LENGTH for prompt in PROMPTS)
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_causal_lm_matches_transformers(tmp_path: Path, tied: bool) -> None:
    model_dir = write_model(tmp_path, False, {"tie_word_embeddings": tied}, seed=51)
    loaded = load_fp32_cpu(model_dir)
    assert isinstance(loaded.model, Ministral3ForCausalLM)
    assert all(isinstance(layer.self_attn, Ministral3Attention) for layer in loaded.model.model.layers)
    assert loaded.model.config.query_scaling == QueryScaling(1.0, ORIGINAL_LENGTH)
    assert_matches_transformers(loaded, model_dir)


@pytest.mark.parametrize("layout", ["published", "transformers-5"])
def test_multimodal_checkpoints_text_model_matches_transformers(tmp_path: Path, layout: str) -> None:
    # With a window shorter than the prompts, as transformers' Ministral 3 applies a stated one.
    model_dir = write_model(tmp_path, True, {"sliding_window": 6}, seed=52)
    if layout == "transformers-5":
        in_transformers_5_layout(model_dir)
    loaded = load_fp32_cpu(model_dir)
    assert isinstance(loaded.model, Mistral3ForConditionalGeneration)
    assert all(isinstance(layer.self_attn, Ministral3Attention) for layer in loaded.model.model.layers)
    assert_matches_transformers(loaded, model_dir)


def test_the_published_defaults_match_transformers(tmp_path: Path) -> None:
    # A config that states no rope_parameters gets Ministral3Config's: YaRN over 16,384 tokens and
    # beta 0.1 (the prompts stay in the first block: a factor of 1).
    model_dir = write_random_model(tmp_path, "ministral3", {"max_position_embeddings": 262144}, seed=53)
    loaded = load_fp32_cpu(model_dir)
    assert loaded.model.config.query_scaling == QueryScaling(0.1, 16384)
    hf = hf_reference_model(model_dir)
    assert_greedy_matches_hf(loaded, hf, [PROMPTS[1]], 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_factors_are_transformers_own(dtype: torch.dtype) -> None:
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

    positions = torch.arange(0, 100_000, 7)
    ours = QueryScaling(0.1, 16384).factors(positions).to(dtype)
    theirs = get_llama_4_attn_scale(positions[None], 0.1, 16384).to(dtype).flatten()
    assert torch.equal(ours, theirs)
    assert ours[0] == 1 and ours[-1] > 1  # the positions cross six blocks


def test_the_scale_changes_only_positions_past_the_original_length(tmp_path: Path) -> None:
    # Against a twin with beta 0: a prompt inside the first block gives the same logits, bit for bit;
    # one past it other logits, and other greedy tokens.
    scaled = load_fp32_cpu(write_model(tmp_path / "a", False, seed=54))
    plain_rope = {"rope_parameters": ministral3_rope(beta=0.0)}
    plain = load_fp32_cpu(write_model(tmp_path / "b", False, plain_rope, seed=54))
    tokens = [greedy_generate(loaded, PROMPTS[1], NEW_TOKENS)[0] for loaded in (scaled, plain)]
    assert tokens[0] != tokens[1]

    def last_logits(loaded: LoadedModel, prompt: list[int]) -> torch.Tensor:
        return run_step(loaded.model, make_kv_caches(loaded, 8), [Chunk(prompt, 0, list(range(8)))])

    inside = list(range(3, 3 + ORIGINAL_LENGTH))
    assert torch.equal(last_logits(scaled, inside), last_logits(plain, inside))
    past = list(range(3, 3 + 2 * ORIGINAL_LENGTH))
    a, b = last_logits(scaled, past), last_logits(plain, past)
    assert (a - b).abs().max() > 1e-2 * a.abs().max()


class RecordingBackend(TorchAttentionBackend):
    """The torch backend, keeping the queries each layer hands it before RoPE."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[torch.Tensor] = []

    def forward_rotating(
        self,
        positions: torch.Tensor,
        rotation: QueryKeyRotation,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        spec: AttentionSpec,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.queries.append(query.clone())
        return super().forward_rotating(positions, rotation, query, key, value, kv_cache, meta, spec, sinks)


@torch.no_grad()
def test_every_backend_is_handed_the_scaled_queries(tmp_path: Path) -> None:
    # The scale is applied before AttentionBackend.forward_rotating, where the Triton backend folds
    # RoPE into its KV write: whichever backend rotates them, the queries it gets are already scaled.
    loaded = load_fp32_cpu(write_model(tmp_path, False, seed=55))
    attention = loaded.model.model.layers[0].self_attn
    assert isinstance(attention, Ministral3Attention)
    hidden = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(40)
    _, _, meta = build_step([Chunk(list(range(40)), 0, list(range(10)))])
    recorded = []
    for scaling in (QueryScaling(1.0, ORIGINAL_LENGTH), QueryScaling(0.0, ORIGINAL_LENGTH)):
        attention.query_scaling = scaling
        backend = RecordingBackend()
        attention(positions, hidden, make_kv_caches(loaded, 10)[0], meta, backend)
        recorded.append(backend.queries[0])
    factors = 1 + torch.log(1 + torch.div(positions, ORIGINAL_LENGTH, rounding_mode="floor").float())
    torch.testing.assert_close(recorded[0], recorded[1] * factors[:, None, None], atol=0, rtol=0)


def test_mixed_batch_matches_requests_run_alone(tmp_path: Path) -> None:
    # A 4-token block: the decode, the new prompt and the second chunk all sit past it.
    model_dir = write_model(tmp_path, False, {"rope_parameters": ministral3_rope(4)}, seed=56)
    assert_mixed_batch_matches_requests_alone(load_fp32_cpu(model_dir))


def test_tensor_parallel_two_ranks_match_single_rank(tmp_path: Path) -> None:
    path = write_model(tmp_path, False, seed=57)
    single = load_fp32_cpu(path)
    ranks = [load_fp32_cpu(path, tp=group) for group in thread_groups(2)]
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[1], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[1], 8), 2):
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)


# rope_parameters lacking each field the query scale reads (a RoPE without YaRN has no original length).
LACKING: dict[str, dict[str, Any]] = {
    "llama_4_scaling_beta": {**ministral3_rope(), "llama_4_scaling_beta": None},
    "original_max_position_embeddings": {
        "rope_type": "default",
        "rope_theta": 1e6,
        "llama_4_scaling_beta": 0.1,
    },
}


@pytest.mark.parametrize("multimodal", [False, True], ids=["causal-lm", "multimodal"])
@pytest.mark.parametrize("field", sorted(LACKING))
def test_a_config_without_the_query_scaling_is_refused(tmp_path: Path, multimodal: bool, field: str) -> None:
    # transformers' model fails on such a config.
    model_dir = write_model(tmp_path, multimodal, seed=58)

    def without(config: dict[str, Any]) -> None:
        (config["text_config"] if multimodal else config)["rope_parameters"] = LACKING[field]

    edit_config(model_dir, without)
    with pytest.raises(ValueError, match=f"Ministral 3 config's rope_parameters lack {field}"):
        load_fp32_cpu(model_dir)


def test_longrope_is_refused(tmp_path: Path) -> None:
    # The runner offsets a long sequence's positions into LongRoPE's long rows: not the position the
    # query scale reads.
    model_dir = write_model(tmp_path, False, seed=59)
    rope = {"rope_type": "longrope", "rope_theta": 1e6, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 16, "llama_4_scaling_beta": 0.1}  # fmt: skip
    edit_config(model_dir, lambda config: config.update(rope_parameters=rope))
    with pytest.raises(ValueError, match="unsupported LongRoPE scaling for Ministral 3"):
        load_fp32_cpu(model_dir)
