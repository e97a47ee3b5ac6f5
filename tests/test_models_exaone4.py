"""EXAONE 4.0 against transformers: norms of the attention's and the MLP's outputs only, per-head q/k
norms, window layers beside global ones that attend without RoPE (or every layer global and rotating,
without a window); batching, tensor parallelism and GGUF files as llama.cpp's converter writes them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchlm.models.exaone4 import Exaone4ForCausalLM, rotating_layers
from batchlm.models.gguf_file import hf_config
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.gguf_reader import GGUFFile
from batchlm.models.random_model import write_random_model
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
SLIDING, FULL = "sliding_attention", "full_attention"
# The 32B model's kind: a window layer (rotating), then a global one (NoPE), the window shorter than the
# second prompt. The 1.2B model's: no window, every layer global and rotating (a config without a
# window states its layer_types: transformers derives none from a pattern then).
CASES: dict[str, dict[str, Any]] = {
    "hybrid": {"sliding_window": 6, "layer_types": [SLIDING, FULL]},
    "global": {"sliding_window": None, "layer_types": [FULL, FULL]},
}
ROTATING = {"hybrid": [True, False], "global": [True, True]}


def assert_matches_transformers(model_dir: Path, hf_dir: Path, rotating: list[bool]) -> None:
    loaded = load_fp32_cpu(model_dir)
    assert isinstance(loaded.model, Exaone4ForCausalLM)
    assert [layer.self_attn.rotates for layer in loaded.model.model.layers] == rotating
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers(tmp_path: Path, case: str, tied: bool) -> None:
    path = write_random_model(tmp_path, "exaone4", {**CASES[case], "tie_word_embeddings": tied}, seed=81)
    assert_matches_transformers(path, path, ROTATING[case])


def test_the_global_layer_of_a_hybrid_sees_no_positions(tmp_path: Path) -> None:
    # One global layer under a window wider than the prompt: it attends to a set of keys, so reordering
    # the earlier tokens leaves the last one's logits as they were. As a window layer it rotates.
    prompt, shuffled = [5, 17, 42, 99, 3], [99, 5, 3, 42, 17]
    for kind, same in ((FULL, True), (SLIDING, False)):
        overrides = {"num_hidden_layers": 1, "sliding_window": 64, "layer_types": [kind]}
        loaded = load_fp32_cpu(write_random_model(tmp_path / kind, "exaone4", overrides, seed=82))
        a, b = (
            run_step(loaded.model, make_kv_caches(loaded, 2), [Chunk([*tokens, 250], 0, [0, 1])])
            for tokens in (prompt, shuffled)
        )
        assert torch.allclose(a, b, atol=1e-6) == same


def test_layers_rotate_as_transformers_decides() -> None:
    def config(window: int | None, kinds: list[str]) -> SimpleNamespace:
        return SimpleNamespace(sliding_window=window, layer_types=kinds, num_hidden_layers=len(kinds))

    assert rotating_layers(config(8, [SLIDING, SLIDING, SLIDING, FULL])) == [True, True, True, False]
    assert rotating_layers(config(None, [FULL, FULL])) == [True, True]
    # A window with no window layer: transformers then rotates none.
    assert rotating_layers(config(8, [FULL, FULL])) == [False, False]


def test_mixed_batch_matches_requests_run_alone(tmp_path: Path) -> None:
    loaded = load_fp32_cpu(write_random_model(tmp_path, "exaone4", CASES["hybrid"], seed=83))
    assert_mixed_batch_matches_requests_alone(loaded)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-heads-split", "kv-head-replicated"])
def test_tensor_parallel_two_ranks_match_single_rank(tmp_path: Path, kv_heads: int) -> None:
    path = write_random_model(
        tmp_path, "exaone4", {**CASES["hybrid"], "num_key_value_heads": kv_heads}, seed=84
    )
    single = load_fp32_cpu(path)
    ranks = [load_fp32_cpu(path, tp=group) for group in thread_groups(2)]
    expected_tokens, expected_logprobs = greedy_generate(single, PROMPTS[1], 8)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[1], 8), 2):
        assert tokens == expected_tokens
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_file_matches_transformers(tmp_path: Path, case: str) -> None:
    # As llama.cpp's converter writes an exaone4 file: q/k rows as HF has them (NeoX RoPE), the output
    # norms under Gemma's names, the window and one window flag a layer in the metadata.
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "exaone4", "F32", overrides=CASES[case], seed=85)
    model_dir = prepare_gguf_model_dir(gguf_path, tmp_path / "cache")
    assert_matches_transformers(model_dir, tmp_path / "hf", ROTATING[case])


@pytest.mark.parametrize(
    ("pattern", "layer_types"),
    [
        (None, [SLIDING, SLIDING, SLIDING, FULL] * 2),  # Exaone4Config's (and llama.cpp's) default
        (2, [SLIDING, FULL] * 4),  # a period: every second layer global
    ],
)
def test_a_gguf_window_without_flags_follows_the_period(
    tmp_path: Path, pattern: int | None, layer_types: list[str]
) -> None:
    gguf_path = write_tiny_gguf(
        tmp_path / "tiny.gguf",
        "exaone4",
        "F32",
        # The model without a window (the builder writes none): the metadata below gives the file one.
        overrides={"num_hidden_layers": 8, "sliding_window": None, "layer_types": [FULL] * 8},
        metadata={"exaone4.attention.sliding_window": 16}
        | ({} if pattern is None else {"exaone4.attention.sliding_window_pattern": pattern}),
        seed=86,
    )
    config = hf_config(GGUFFile(gguf_path), gguf_path)
    assert (config["sliding_window"], config["layer_types"]) == (16, layer_types)
