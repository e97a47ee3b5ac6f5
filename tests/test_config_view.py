"""ConfigView: where read_config_view accepts a config.json, the model built from the view equals the one
built from transformers' config class (shapes, context limit, parameters, logits); elsewhere it declines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm.models.checkpoint import load_hf_config
from batchlm.models.config_view import MUST_STATE, ConfigView, read_config_view
from batchlm.models.loader import LoadedModel, init_random_weights, load_model, model_shape
from batchlm.models.model_config import read_model_config
from batchlm.models.random_model import ARCHITECTURES, TINY_CONFIG
from batchlm.models.registry import get_model_class
from models_harness import Chunk, make_kv_caches, run_step

CPU = torch.device("cpu")
PROMPT = [5, 17, 42, 99, 3, 250, 7]


def config_dict(model_type: str, **changes: Any) -> dict[str, Any]:
    """A tiny config.json as older transformers wrote it (rope_theta, no rope_parameters)."""
    raw: dict[str, Any] = {
        **TINY_CONFIG,
        "model_type": model_type,
        "architectures": [ARCHITECTURES[model_type]],
        "rope_theta": 10000.0,
    }
    for key, value in changes.items():
        if value is DROP:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


DROP = object()  # config_dict(..., field=DROP) removes the field


def write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def logits_of(config: Any) -> torch.Tensor:
    """Last-token logits of PROMPT through the model built from `config` (same seeded weights)."""
    model_config = read_model_config(config)
    model = get_model_class(str(config.architectures[0]))(model_config).eval()
    init_random_weights(model, std=0.05, seed=3)
    loaded = LoadedModel(model, config, Path("."), model_shape(model_config), torch.float32, CPU)
    return run_step(model, make_kv_caches(loaded, 2), [Chunk(PROMPT, 0, [0, 1])])


ACCEPTED = [
    ("llama", {}),
    ("llama", {"hidden_act": DROP, "attention_bias": DROP, "mlp_bias": DROP, "tie_word_embeddings": DROP}),
    ("llama", {"head_dim": DROP, "rope_theta": DROP}),
    ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 128}}),
    ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}}),
    ("mistral", {"sliding_window": None}),
    ("mistral", {"sliding_window": 64, "rope_theta": 1e6}),
    ("qwen2", {}),
    ("qwen2", {"sliding_window": 64, "use_sliding_window": False}),
    ("qwen2", {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 1}),
    ("qwen2", {"sliding_window": 64, "use_sliding_window": True,
               "layer_types": ["full_attention", "sliding_attention"]}),
    ("qwen3", {"attention_bias": DROP, "tie_word_embeddings": True}),
]  # fmt: skip


@pytest.mark.parametrize(("model_type", "changes"), ACCEPTED)
def test_view_builds_the_same_model_as_transformers(model_type: str, changes: dict, tmp_path: Path) -> None:
    model_dir = write(tmp_path, config_dict(model_type, **changes))
    view = read_config_view(model_dir)
    assert isinstance(view, ConfigView)
    reference = load_hf_config(model_dir)
    assert read_model_config(view) == read_model_config(reference)
    view_class, reference_class = (
        get_model_class(view.architectures[0]),
        get_model_class(reference.architectures[0]),
    )
    assert view_class is reference_class
    torch.testing.assert_close(logits_of(view), logits_of(reference), rtol=0, atol=0)


@pytest.mark.parametrize("model_type", sorted(MUST_STATE))
def test_configs_written_by_transformers_are_read_as_views(model_type: str, tmp_path: Path) -> None:
    from batchlm.models.random_model import write_random_model

    model_dir = write_random_model(tmp_path, model_type)
    view = read_config_view(model_dir)
    assert isinstance(view, ConfigView)  # transformers 5 writes rope_parameters and every field
    reference = load_hf_config(model_dir)
    assert read_model_config(view) == read_model_config(reference)
    torch.testing.assert_close(logits_of(view), logits_of(reference), rtol=0, atol=0)


DECLINED = [
    ("llama", {"rms_norm_eps": DROP}, "norm epsilon defaults differ"),
    ("llama", {"max_position_embeddings": DROP}, "context defaults differ per class"),
    ("llama", {"num_key_value_heads": DROP}, "KV head defaults differ per class"),
    ("llama", {"hidden_size": True}, "a bool is not a size"),
    ("llama", {"head_dim": "64"}, "a string is not a size"),
    ("llama", {"rope_theta": "1e4"}, "a string is not a theta"),
    ("llama", {"rope_scaling": [1, 2]}, "rope_scaling must be a dict"),
    ("llama", {"attention_bias": "yes"}, "flags must be bools"),
    ("llama", {"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture: transformers path errors"),
    ("llama", {"architectures": DROP}, "no architecture: transformers path errors"),
    ("gemma", {}, "unknown model type"),
    ("mistral", {"sliding_window": DROP}, "MistralConfig defaults to a 4096 window"),
    ("qwen2", {"sliding_window": 64}, "Qwen turns a window off without use_sliding_window"),
    ("qwen3", {"head_dim": DROP}, "Qwen3Config defaults head_dim to 128"),
    ("qwen2", {"sliding_window": 64, "use_sliding_window": True}, "max_window_layers defaults to 28"),
]


@pytest.mark.parametrize(("model_type", "changes", "why"), DECLINED)
def test_view_declines_where_transformers_could_read_differently(
    model_type: str, changes: dict, why: str, tmp_path: Path
) -> None:
    raw = config_dict(model_type if model_type in ARCHITECTURES else "llama", **changes)
    raw["model_type"] = model_type
    assert read_config_view(write(tmp_path, raw)) is None, why


def test_missing_or_broken_config_json_is_left_to_the_transformers_path(tmp_path: Path) -> None:
    assert read_config_view(tmp_path) is None
    (tmp_path / "config.json").write_text("{not json")
    assert read_config_view(tmp_path) is None
    (tmp_path / "config.json").write_text("[1, 2]")
    assert read_config_view(tmp_path) is None


def test_overrides_apply_before_the_checks(tmp_path: Path) -> None:
    model_dir = write(tmp_path, config_dict("llama", rms_norm_eps=DROP))
    assert read_config_view(model_dir) is None
    view = read_config_view(model_dir, {"rms_norm_eps": 1e-3, "max_position_embeddings": 100})
    assert view is not None and view.rms_norm_eps == 1e-3 and view.max_position_embeddings == 100


def test_view_behaves_like_a_config_for_getattr_defaults(tmp_path: Path) -> None:
    view = read_config_view(write(tmp_path, config_dict("llama", mlp_bias=DROP)))
    assert view is not None
    assert getattr(view, "mlp_bias", "default") == "default"
    with pytest.raises(AttributeError):
        _ = view.sliding_window
    assert view.to_dict()["hidden_size"] == TINY_CONFIG["hidden_size"]


def test_load_model_uses_the_view_and_falls_back(tmp_path: Path) -> None:
    light, heavy = tmp_path / "light", tmp_path / "heavy"
    light.mkdir()
    heavy.mkdir()
    write(light, config_dict("llama"))
    write(heavy, config_dict("llama", rms_norm_eps=DROP))
    from_view = load_model(light, torch.float32, CPU, random_weights=True, seed=1, progress=False)
    from_transformers = load_model(heavy, torch.float32, CPU, random_weights=True, seed=1, progress=False)
    assert isinstance(from_view.hf_config, ConfigView)
    assert not isinstance(from_transformers.hf_config, ConfigView)
    assert from_transformers.hf_config.rms_norm_eps == 1e-6  # LlamaConfig's default fills the gap
    assert from_view.shape == from_transformers.shape
