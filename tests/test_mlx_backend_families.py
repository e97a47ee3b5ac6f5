"""The MLX backend serves Gemma 2/3, Phi-3, Mistral, Ministral 3 and Mistral 3's text model through mlx-lm
past their sliding window: Gemma 3 with its windows and per-layer RoPE bases from a transformers 5
config, the families whose mlx-lm module ignores the window (or, Ministral 3's, applies it only to the
layers layer_types names) through rotating caches on their windowed layers; and Granite, OLMo 2,
SmolLM3, GLM-4, EXAONE 4.0, Ministral 3 (its queries scaled by position) and Seed-OSS on mlx-lm's own
modules (EXAONE 4.0's layer pattern and GLM-4's rotating share given under the names mlx-lm reads).
Greedy tokens equal transformers' (float32, CPU)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import batchlm.backends as backends
from batchlm.backends.mlx.families import mlx_lm_overrides, window_context_cap, windowed_layers
from batchlm.config import EngineConfig
from batchlm.engine.client import EngineDeadError
from batchlm.sampling_params import SamplingParams
from models_harness import hf_generated, hf_greedy, hf_reference_model
from test_models_ministral3 import MINISTRAL3

needs_mlx = pytest.mark.skipif(not backends.mlx_available(), reason="mlx and mlx-lm are not installed")
WINDOW = 8
LAYERS = ["sliding_attention"] * 2 + ["full_attention"]
ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}  # fmt: skip
GEMMA3: dict[str, Any] = {"num_hidden_layers": 6, "layer_types": LAYERS * 2, "sliding_window": WINDOW,
                          "rope_parameters": ROPE, "pad_token_id": 0}  # fmt: skip
WINDOWED_BY_CACHE: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma2": ("gemma2", {"sliding_window": WINDOW, "pad_token_id": 0}),
    "phi3": ("phi3", {"sliding_window": WINDOW, "pad_token_id": 0}),
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    # Mistral 3's text model, its RoPE base stated only as transformers 5 nests it (rope_parameters in
    # text_config), which mlx-lm does not read.
    "mistral3": (
        "mistral3",
        {"sliding_window": WINDOW, "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}},
    ),
    # mlx-lm's Ministral 3 windows only the layers `layer_types` names, where transformers windows
    # every layer of a config with a window; as its own checkpoint and in a Mistral 3.
    "ministral3": ("ministral3", {**MINISTRAL3, "sliding_window": WINDOW}),
    "mistral3-ministral3": (
        "mistral3",
        {**MINISTRAL3, "text_model_type": "ministral3", "sliding_window": WINDOW},
    ),
}


def transformers_tokens(model_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    return hf_generated(hf_reference_model(model_dir), prompt, new_tokens)


def mlx_tokens(
    model_dir: Path, prompts: list[list[int]], new_tokens: int, prefill_chunk: int | None = None
) -> tuple[int, list[list[int]]]:
    from test_mlx_backend_engine import EngineHarness, joined

    config = EngineConfig(model=str(model_dir), max_num_seqs=4, max_num_batched_tokens=prefill_chunk)
    harness = EngineHarness(config)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        tokens = [joined(harness.collect(p, params, f"r{i}"))[1] for i, p in enumerate(prompts)]
        return harness.engine.model_info.facts.max_model_len, tokens
    finally:
        harness.close()


@needs_mlx
def test_gemma3_serves_past_its_window(tiny_model_dir: Callable[..., Path]) -> None:
    model_dir = tiny_model_dir("gemma3_text", tied=True, seed=3, **GEMMA3)
    base = list(range(10, 30))
    # The later prompts share a prefix longer than the window with the first (prompt-cache lookups).
    prompts = [[*base, 40, 41], [5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11], [*base, 50], [*base, 40, 41]]
    max_model_len, ours = mlx_tokens(model_dir, prompts, 10)
    assert max_model_len == 512
    assert ours == [transformers_tokens(model_dir, p, 10) for p in prompts]


@needs_mlx
@pytest.mark.parametrize("prefill_chunk", [None, WINDOW + 2])
@pytest.mark.parametrize("family", sorted(WINDOWED_BY_CACHE))
def test_families_whose_mlx_module_ignores_the_window_serve_past_it(
    tiny_model_dir: Callable[..., Path],
    family: str,
    prefill_chunk: int | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model_type, overrides = WINDOWED_BY_CACHE[family]
    # Gemma checkpoints tie the LM head to the embedding (mlx-lm's Gemma 2 has no separate head).
    model_dir = tiny_model_dir(model_type, tied=model_type == "gemma2", seed=4, **overrides)
    base = list(range(10, 33))
    # Prompts longer than the window (prefilled in one chunk, or in chunks each longer than the
    # window), a short one that decodes past it, and prompts sharing a prefix longer than the window
    # (prompt-cache lookups).
    prompts = [[*base, 40, 41], [5, 17, 42, 99], [*base, 50], [*base, 40, 41]]
    with caplog.at_level(logging.WARNING, logger="batchlm.backends.mlx.loader"):
        max_model_len, ours = mlx_tokens(model_dir, prompts, 12, prefill_chunk)
    assert max_model_len > WINDOW
    assert not [r for r in caplog.records if "sliding window" in r.getMessage()]
    assert ours == [transformers_tokens(model_dir, p, 12) for p in prompts]


# Families mlx-lm runs with modules of their own (no window to apply): served as they are.
OWN_MODULES: dict[str, tuple[str, dict[str, Any]]] = {
    "granite": ("granite", {"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                            "attention_multiplier": 0.5, "logits_scaling": 0.25}),
    "olmo2": ("olmo2", {"pad_token_id": 0}),
    "smollm3": ("smollm3", {"no_rope_layers": [1, 0], "pad_token_id": 0}),
    "glm4": ("glm4", {"pad_token_id": 0}),
    # A window layer, then a global one without RoPE (mlx-lm's module applies the window itself).
    "exaone4": ("exaone4", {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}),
    # Queries scaled by position (every 16 tokens) over YaRN, as its own checkpoint and in a Mistral 3.
    "ministral3": ("ministral3", MINISTRAL3),
    "mistral3-ministral3": ("mistral3", {**MINISTRAL3, "text_model_type": "ministral3"}),
    "seed_oss": ("seed_oss", {"attention_out_bias": True, "pad_token_id": 0}),
}  # fmt: skip


@needs_mlx
@pytest.mark.parametrize("family", sorted(OWN_MODULES))
def test_families_of_mlx_lm_modules_match_transformers(
    tiny_model_dir: Callable[..., Path], family: str
) -> None:
    model_type, overrides = OWN_MODULES[family]
    model_dir = tiny_model_dir(model_type, seed=6, **overrides)
    prompts = [[5, 17, 42, 99, 3, 250, 7], list(range(10, 33))]
    _, ours = mlx_tokens(model_dir, prompts, 12)
    # transformers' greedy picks with EOS a token like any other, as ignore_eos has it here.
    hf = hf_reference_model(model_dir)
    assert ours == [hf_greedy(hf, p, 12)[0] for p in prompts]


def batched_mlx_tokens(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens of the prompts decoded side by side: one GenerationLoop, every request added at once."""
    from batchlm.backends.mlx.loader import load_model
    from batchlm.backends.mlx.loop import GenerationLoop, LoopSettings
    from batchlm.request import EngineCoreRequest

    loaded = load_model(EngineConfig(model=str(model_dir)), model_dir)
    loop = GenerationLoop(loaded.model, loaded.vocab_size, LoopSettings(len(prompts), 64, 4, 1 << 28), "tiny")
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        loop.add_request(EngineCoreRequest(f"r{index}", tuple(prompt), params, (1,), 0.0))
    tokens: dict[str, list[int]] = {f"r{index}": [] for index in range(len(prompts))}
    for _ in range(10 * new_tokens):
        if not loop.has_work():
            break
        for output in loop.step():
            assert output.error is None, output.error
            tokens[output.request_id] += output.new_token_ids
    loop.close()
    return list(tokens.values())


@needs_mlx
def test_gemma2_decodes_sequences_side_by_side(tiny_model_dir: Callable[..., Path]) -> None:
    """mlx-lm's Gemma 2 attends with its query heads grouped per KV head ([B, kv heads, repeats, L, S]
    scores), where a batch's mask ([B, 1, L, S]) did not broadcast: every step with two or more
    sequences (n > 1, or concurrent requests) failed."""
    model_dir = tiny_model_dir("gemma2", tied=True, seed=4, pad_token_id=0)
    prompts = [[5, 17, 42, 99], [10, 11, 12, 13, 14, 15, 16], [7, 8]]
    assert batched_mlx_tokens(model_dir, prompts, 6) == [
        transformers_tokens(model_dir, p, 6) for p in prompts
    ]


@needs_mlx
@pytest.mark.parametrize("family", ["glm4", "exaone4", "ministral3", "seed_oss"])
def test_families_of_mlx_lm_modules_decode_sequences_side_by_side(
    tiny_model_dir: Callable[..., Path], family: str
) -> None:
    # EXAONE 4.0's window layers on mlx-lm's rotating caches, batched; a prompt longer than the window.
    # Ministral 3's query scale from each sequence's own offset in the batch's cache.
    model_type, overrides = OWN_MODULES[family]
    model_dir = tiny_model_dir(model_type, seed=6, **overrides)
    prompts = [[5, 17, 42, 99], list(range(10, 33)), [7, 8]]
    hf = hf_reference_model(model_dir)
    assert batched_mlx_tokens(model_dir, prompts, 12) == [hf_greedy(hf, p, 12)[0] for p in prompts]


def test_transformers_5_gemma3_fields_become_what_mlx_lm_reads() -> None:
    raw = {"model_type": "gemma3_text", "layer_types": LAYERS * 2, "rope_parameters": ROPE}
    assert mlx_lm_overrides(raw) == {
        "rope_theta": 1e6,
        "rope_local_base_freq": 50.0,
        "sliding_window_pattern": 3,
    }
    stated = {**raw, "rope_theta": 5.0, "sliding_window_pattern": 3}
    assert "rope_theta" not in mlx_lm_overrides(stated) and "sliding_window_pattern" not in mlx_lm_overrides(
        stated
    )
    assert mlx_lm_overrides({"model_type": "llama", "rope_parameters": ROPE}) == {}
    with pytest.raises(ValueError, match="repeating window/global pattern"):
        mlx_lm_overrides(
            {"model_type": "gemma3_text", "layer_types": ["full_attention", "sliding_attention"]}
        )


@pytest.mark.parametrize(
    "fields",
    [
        {"layer_types": ["sliding_attention"] * 2},  # no global layer at all
        {},  # mlx-lm's default pattern (6) over 2 layers
        {"sliding_window_pattern": 3},
    ],
)
def test_a_gemma3_without_a_global_layer_is_refused_at_load(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"no global-attention layer.*--backend torch"):
        mlx_lm_overrides({"model_type": "gemma3_text", "num_hidden_layers": 2, **fields})
    mlx_lm_overrides({"model_type": "gemma3_text", "num_hidden_layers": 6})  # its 6th layer is global


@needs_mlx
def test_a_gemma3_mlx_lm_cannot_run_fails_start_naming_the_cause(tiny_model_dir: Callable[..., Path]) -> None:
    from batchlm.backends.mlx.engine import MLXEngine

    model_dir = tiny_model_dir("gemma3_text", tied=True, seed=5, layer_types=["sliding_attention"] * 2)
    engine = MLXEngine(EngineConfig(model=str(model_dir)))
    with pytest.raises(EngineDeadError, match="no global-attention layer"):
        asyncio.run(asyncio.wait_for(engine.start(), 120))  # the timeout only guards against a hang


def test_window_caps_only_families_whose_window_is_not_applied() -> None:
    assert window_context_cap({"model_type": "gemma2", "sliding_window": 4096}) is None
    assert window_context_cap({"model_type": "mixtral", "sliding_window": 4096}) == 4096
    assert window_context_cap({"model_type": "gemma3_text", "sliding_window": 512}) is None
    assert (
        window_context_cap({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False})
        is None
    )
    assert window_context_cap({"model_type": "llama"}) is None


@pytest.mark.parametrize(
    ("fields", "cap"),
    [
        ({}, None),  # transformers drops a window unless use_sliding_window is true
        ({"use_sliding_window": True}, None),  # the first 28 layers are full, of 24
        ({"use_sliding_window": True, "max_window_layers": 30}, None),
        ({"use_sliding_window": True, "max_window_layers": 12}, 4096),
        ({"use_sliding_window": True, "layer_types": ["full_attention"] * 24}, None),
        ({"use_sliding_window": True, "layer_types": ["sliding_attention"] * 24}, 4096),
    ],
)
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_a_qwen_window_caps_the_context_only_where_transformers_applies_it(
    model_type: str, fields: dict[str, Any], cap: int | None
) -> None:
    config = {"model_type": model_type, "sliding_window": 4096, "num_hidden_layers": 24, **fields}
    assert window_context_cap(config) == cap


def test_qwen3_moe_windows_every_layer_once_switched_on() -> None:
    config = {"model_type": "qwen3_moe", "sliding_window": 4096, "num_hidden_layers": 48}
    assert window_context_cap(config) is None
    assert window_context_cap({**config, "use_sliding_window": True}) == 4096


def test_windowed_layers_follow_layer_types_else_the_family_pattern() -> None:
    gemma2 = {"model_type": "gemma2", "sliding_window": 8}
    assert windowed_layers(gemma2, 4) == [True, False, True, False]
    assert windowed_layers({**gemma2, "layer_types": ["full_attention", "sliding_attention"]}, 2) == [
        False,
        True,
    ]
    assert windowed_layers({"model_type": "mistral", "sliding_window": 8}, 3) == [True] * 3
    assert windowed_layers({"model_type": "mistral", "sliding_window": None}, 3) is None
    assert windowed_layers({"model_type": "ministral3", "sliding_window": 8}, 3) == [True] * 3
    assert (
        windowed_layers({"model_type": "phi3", "sliding_window": 8, "use_sliding_window": False}, 3) is None
    )
    assert windowed_layers({"model_type": "mixtral", "sliding_window": 8}, 3) is None


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"layer_types": ["sliding_attention"] * 3 + ["full_attention"]}, "LLLG"),
        ({"sliding_window_pattern": 2}, "LGLG"),  # a period, as transformers derives layer_types from it
        ({"sliding_window_pattern": "LLLG"}, "LLLG"),
        ({"sliding_window": None, "sliding_window_pattern": 0}, None),  # no window: global and rotating
    ],
)
def test_exaone4_layers_become_the_pattern_mlx_lm_reads(fields: dict[str, Any], pattern: str | None) -> None:
    # mlx-lm's EXAONE 4 indexes the pattern as a string (an int raised at load) and requires rope_scaling.
    raw = {"model_type": "exaone4", "num_hidden_layers": 4, "sliding_window": 8, **fields}
    assert mlx_lm_overrides(raw) == {"sliding_window_pattern": pattern, "rope_scaling": None}
    scaled = {**raw, "rope_scaling": {"rope_type": "llama3", "factor": 16.0}}
    assert mlx_lm_overrides(scaled) == {"sliding_window_pattern": pattern}


@pytest.mark.parametrize("kind", ["sliding_attention", "full_attention"])
def test_an_exaone4_window_without_both_kinds_of_layer_is_refused(kind: str) -> None:
    # mlx-lm's module builds its masks from its first window layer and its first global one.
    raw = {"model_type": "exaone4", "num_hidden_layers": 2, "sliding_window": 8, "layer_types": [kind] * 2}
    with pytest.raises(ValueError, match=r"do not mix window and global layers.*--backend torch"):
        mlx_lm_overrides(raw)


def test_glm4s_partial_rotation_gets_its_older_name(tmp_path: Path) -> None:
    # transformers 5 keeps GLM-4's partial_rotary_factor in rope_parameters; mlx-lm's GLM-4 requires it.
    import json

    from batchlm.backends.mlx.config_names import older_field_names

    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm4", "rope_parameters": rope}))
    assert older_field_names(tmp_path) == {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}


def test_a_nested_text_config_gets_the_older_names_too(tmp_path: Path) -> None:
    # mlx-lm builds Mistral 3's language model from text_config, whose RoPE base transformers 5 nests.
    import json

    from batchlm.backends.mlx.config_names import older_field_names

    text = {"model_type": "mistral", "rope_parameters": {"rope_type": "default", "rope_theta": 1e9}}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral3", "text_config": text}))
    assert older_field_names(tmp_path) == {"text_config": {**text, "rope_theta": 1e9}}
    stated = {**text, "rope_theta": 1e9}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral3", "text_config": stated}))
    assert older_field_names(tmp_path) == {}
