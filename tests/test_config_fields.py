"""Config fields of the supported families read as transformers reads them, or refused at load naming
the field: tiny random models compared with transformers' own forward where the field changes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.loader import LoadedModel, load_model
from batchlm.models.random_model import write_random_model
from gguf_builder import write_tiny_gguf
from models_harness import assert_greedy_matches_hf


def assert_greedy_matches_transformers(loaded: LoadedModel, path: Path, prompt: list[int]) -> None:
    """Four greedy tokens of `prompt`, and their logprobs, as transformers' model of `path` gives them."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, [prompt], 4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_partial_rotary_outside_phi3_is_refused(tmp_path: Path, model_type: str) -> None:
    # transformers' Llama-style models rotate every head dimension whatever the field says.
    path = write_random_model(tmp_path, model_type, {"partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match=r"partial_rotary_factor=0\.5"):
        load_model(path, torch.float32, torch.device("cpu"), progress=False)


def test_a_gguf_rotating_part_of_llama_heads_is_refused(tmp_path: Path) -> None:
    # llama.cpp would rotate 32 of the 64 dimensions; batchlm's Llama turns them all.
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", overrides={"partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match=r"'llama\.rope\.dimension_count' is 32"):
        prepare_gguf_model_dir(gguf_path, tmp_path / "cache")


@pytest.mark.parametrize(
    ("model_type", "scaling"),
    [
        ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
        ("qwen3", {"type": "yarn", "factor": 4.0}),
    ],
)
def test_the_configs_own_original_length_wins_over_the_rope_dicts(
    tmp_path: Path, model_type: str, scaling: dict[str, Any]
) -> None:
    # transformers gives the config's original_max_position_embeddings priority over one inside
    # rope_scaling; 40-token prompts reach past both lengths, so reading the other one shows.
    path = write_random_model(tmp_path, model_type, seed=3)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(
        rope_scaling={**scaling, "original_max_position_embeddings": 16},
        rope_theta=10000.0,
        original_max_position_embeddings=32,
    )
    (path / "config.json").write_text(json.dumps(config))
    loaded = load_model(path, torch.float32, torch.device("cpu"), progress=False)
    assert loaded.config.layers[0].rope.params["original_max_position_embeddings"] == 32
    assert_greedy_matches_transformers(loaded, path, list(range(30, 70)))


def test_qwen3_moe_windows_every_layer_whatever_max_window_layers_says(tmp_path: Path) -> None:
    # Qwen3-MoE configs carry max_window_layers, but only the dense Qwen configs act on it.
    overrides = {"sliding_window": 4, "use_sliding_window": True, "max_window_layers": 1}
    path = write_random_model(tmp_path, "qwen3_moe", overrides, seed=3)
    loaded = load_model(path, torch.float32, torch.device("cpu"), progress=False)
    assert [layer.attention.sliding_window for layer in loaded.config.layers] == [4, 4]
    assert_greedy_matches_transformers(loaded, path, list(range(30, 50)))


def test_rope_scaling_added_beside_rope_parameters_is_read_as_transformers_does(tmp_path: Path) -> None:
    # A config.json written by transformers 5 (rope_parameters) with rope_scaling added by hand, as
    # long-context instructions say: transformers takes rope_scaling.
    path = write_random_model(tmp_path, "llama", seed=3)
    config = json.loads((path / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "default"
    config["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    (path / "config.json").write_text(json.dumps(config))
    loaded = load_model(path, torch.float32, torch.device("cpu"), progress=False)
    assert loaded.config.layers[0].rope.params["rope_type"] == "linear"
    assert loaded.config.max_model_len == 4 * 512


def test_the_mlx_context_length_reads_the_rope_fields_as_transformers_does() -> None:
    from batchlm.backends.mlx.loader import model_context_length

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    base = {"model_type": "qwen3", "max_position_embeddings": 40}
    # rope_scaling over rope_parameters; the config's own original length over the RoPE dict's.
    both = {**base, "rope_parameters": {"rope_type": "default"}, "rope_scaling": yarn}
    assert model_context_length(both) == 64
    assert model_context_length({**both, "original_max_position_embeddings": 32}) == 128
