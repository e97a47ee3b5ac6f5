"""SmolLM3 against transformers: layers without RoPE (NoPE) beside rotating ones, windowed NoPE layers,
batching, tensor parallelism and GGUF files as llama.cpp writes them (every fourth layer NoPE)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.random_model import write_random_model
from batchlm.models.smollm3 import SmolLM3ForCausalLM, rotating_layers
from gguf_builder import write_tiny_gguf
from models_harness import (
    PROMPTS,
    Chunk,
    assert_greedy_matches_hf,
    assert_mixed_batch_matches_requests_alone,
    greedy_generate,
    load_fp32_cpu,
    make_kv_caches,
    run_ranks,
    run_step,
    thread_groups,
)

NEW_TOKENS = 20
# Layer 1 of 2 attends without RoPE; then, as a config may have it, within a window shorter than the
# second prompt (transformers windows the NoPE layers when use_sliding_window is on).
# (SmolLM3Config's pad_token_id, 128004, lies outside the tiny vocabulary.)
CASES: dict[str, dict[str, Any]] = {
    "nope": {"no_rope_layers": [1, 0], "pad_token_id": 0},
    "nope-windowed": {
        "no_rope_layers": [1, 0],
        "use_sliding_window": True,
        "sliding_window": 6,
        "pad_token_id": 0,
    },
}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers(tmp_path: Path, case: str, tied: bool) -> None:
    path = write_random_model(tmp_path, "smollm3", {**CASES[case], "tie_word_embeddings": tied}, seed=61)
    loaded = load_fp32_cpu(path)
    assert isinstance(loaded.model, SmolLM3ForCausalLM)
    assert [layer.self_attn.rotates for layer in loaded.model.model.layers] == [True, False]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)


def test_the_nope_layer_sees_no_positions(tmp_path: Path) -> None:
    # A one-layer NoPE model attends to a set of keys: a prompt whose earlier tokens are reordered gives
    # its last token the same logits. With RoPE on, it does not.
    prompt, shuffled = [5, 17, 42, 99, 3], [99, 5, 3, 42, 17]
    for rotating, same in ((0, True), (1, False)):
        overrides = {"num_hidden_layers": 1, "no_rope_layers": [rotating], "pad_token_id": 0}
        loaded = load_fp32_cpu(write_random_model(tmp_path / str(rotating), "smollm3", overrides, seed=62))
        a, b = (
            run_step(loaded.model, make_kv_caches(loaded, 2), [Chunk([*tokens, 250], 0, [0, 1])])
            for tokens in (prompt, shuffled)
        )
        assert torch.allclose(a, b, atol=1e-6) == same


def test_layers_rotate_as_the_list_or_the_interval_says() -> None:
    assert rotating_layers(SimpleNamespace(no_rope_layers=[1, 1, 0]), 3) == [True, True, False]
    assert rotating_layers(SimpleNamespace(no_rope_layer_interval=2), 4) == [True, False, True, False]
    assert rotating_layers(SimpleNamespace(), 8) == [True, True, True, False] * 2
    with pytest.raises(ValueError, match="no_rope_layers names 2 layers but num_hidden_layers is 3"):
        rotating_layers(SimpleNamespace(no_rope_layers=[1, 0]), 3)


def test_mixed_batch_matches_requests_run_alone(tmp_path: Path) -> None:
    loaded = load_fp32_cpu(write_random_model(tmp_path, "smollm3", CASES["nope"], seed=63))
    assert_mixed_batch_matches_requests_alone(loaded)


def test_tensor_parallel_two_ranks_match_single_rank(tmp_path: Path) -> None:
    path = write_random_model(tmp_path, "smollm3", CASES["nope-windowed"], seed=64)
    single = load_fp32_cpu(path)
    ranks = [load_fp32_cpu(path, tp=group) for group in thread_groups(2)]
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[1], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[1], 8), 2):
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)


def test_gguf_file_matches_transformers(tmp_path: Path) -> None:
    # llama.cpp's smollm3: q/k rows permuted as Llama's; RoPE left out of every fourth layer, a fixed
    # step the file does not state (the HF model's default interval).
    gguf_path = write_tiny_gguf(
        tmp_path / "tiny.gguf",
        "smollm3",
        "F32",
        True,
        overrides={"num_hidden_layers": 4, "pad_token_id": 0},
        seed=65,
    )
    loaded = load_fp32_cpu(prepare_gguf_model_dir(gguf_path, tmp_path / "cache"))
    assert [layer.self_attn.rotates for layer in loaded.model.model.layers] == [True, True, True, False]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)
