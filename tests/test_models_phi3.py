"""Phi-3 / Phi-4-mini against transformers: fused checkpoint tensors, partial rotary, LongRoPE and a
sliding window shorter than the context."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from batchlm.layers.rope_scaling import read_rope_parameters
from batchlm.layers.rotary import RopeSpec, build_rope
from batchlm.models.loader import load_model
from batchlm.models.phi3 import Phi3ForCausalLM
from batchlm.models.random_model import TINY_CONFIG, write_random_model
from models_harness import (
    CPU,
    PROMPTS,
    assert_greedy_matches_hf,
    greedy_generate,
    run_ranks,
    thread_groups,
)

NEW_TOKENS = 16
ORIGINAL = 64  # LongRoPE's pretraining length in these configs; the tests stay below it
# Partial rotary 0.5 of head_dim 16: 8 rotating dimensions, 4 frequencies.
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.3, 2.1, 3.7], "long_factor": [1.5, 4.0, 9.0, 20.0]}  # fmt: skip
CASES: dict[str, dict[str, Any]] = {
    "phi3": {"pad_token_id": 0},
    "phi3-window": {"pad_token_id": 0, "sliding_window": 6},
    "phi4-mini": {"pad_token_id": 0, "rope_parameters": LONGROPE, "original_max_position_embeddings": ORIGINAL,
                  "tie_word_embeddings": True, "sliding_window": 6},
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers(tmp_path: Path, case: str) -> None:
    path = write_random_model(tmp_path, "phi3", CASES[case], seed=21)
    loaded = load_model(path, torch.float32, CPU, progress=False)
    assert isinstance(loaded.model, Phi3ForCausalLM)
    assert loaded.shape.max_model_len == 512
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert any(name.endswith("qkv_proj.weight") for name, _ in hf.named_parameters())  # fused on disk
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)


def test_longrope_tables_follow_transformers_short_and_long() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.for_model("phi3", **{**TINY_CONFIG, **CASES["phi4-mini"]})
    params = read_rope_parameters(config)
    rope = build_rope(RopeSpec(params, 8, config.max_position_embeddings), 16, 512)
    init = ROPE_INIT_FUNCTIONS["longrope"]
    for position, seq_len in ((ORIGINAL - 1, ORIGINAL), (300, ORIGINAL + 1)):
        inv_freq, factor = init(config, CPU, seq_len=seq_len)
        angles = position * inv_freq
        expected = torch.cat((angles.cos() * factor, angles.sin() * factor))
        torch.testing.assert_close(rope.cos_sin_cache[position], expected, atol=1e-6, rtol=1e-6)


def test_a_misshapen_fused_tensor_is_named(tmp_path: Path) -> None:
    from batchlm.models.phi3 import split_fused_tensors

    loaded = load_model(
        write_random_model(tmp_path, "phi3", CASES["phi3"]), torch.float32, CPU, progress=False
    )
    bad = [("model.layers.0.self_attn.qkv_proj.weight", torch.zeros(5, 64))]
    with pytest.raises(ValueError, match=r"qkv_proj\.weight has 5 rows"):
        list(split_fused_tensors(bad, loaded.config))


def test_tensor_parallel_two_ranks_split_the_fused_tensors_alike(tmp_path: Path) -> None:
    path = write_random_model(tmp_path, "phi3", CASES["phi4-mini"], seed=22)
    single = load_model(path, torch.float32, CPU, progress=False)
    ranks = [load_model(path, torch.float32, CPU, progress=False, tp=group) for group in thread_groups(2)]
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[1], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[1], 8), 2):
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)
