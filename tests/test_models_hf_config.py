"""Facts derived from HF configs: head size, KV heads, context limit with RoPE scaling and windows."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from transformers import AutoConfig

from batchlm.models.hf_config import (
    check_common_support,
    context_length,
    head_dim_of,
    layer_types_of,
    num_kv_heads_of,
)


def _config(**fields: Any) -> SimpleNamespace:
    base = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 1024}
    return SimpleNamespace(**{**base, **fields})


def test_head_dim_explicit_or_derived() -> None:
    assert head_dim_of(_config()) == 16
    assert head_dim_of(_config(head_dim=128)) == 128
    assert head_dim_of(_config(head_dim=None)) == 16


def test_kv_heads_default_to_attention_heads() -> None:
    assert num_kv_heads_of(_config()) == 4
    assert num_kv_heads_of(_config(num_key_value_heads=1)) == 1


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, 1024),
        ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, 4096),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, 2048),
        # Qwen2.5-style yarn: original length times the factor.
        ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}, 4096),
        # llama3 configs already state the extended length.
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                }
            },
            1024,
        ),
        # A sliding window is not a context cap.
        ({"sliding_window": 256}, 1024),
        ({"sliding_window": 256, "use_sliding_window": False}, 1024),
        ({"sliding_window": None}, 1024),
    ],
)
def test_context_length(fields: dict[str, Any], expected: int) -> None:
    assert context_length(_config(**fields)) == expected


def test_real_transformers_configs() -> None:
    mistral = AutoConfig.for_model("mistral", max_position_embeddings=32768, sliding_window=4096)
    assert context_length(mistral) == 32768
    qwen2 = AutoConfig.for_model(
        "qwen2", max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False
    )
    assert context_length(qwen2) == 32768


def test_unsupported_activation_is_named() -> None:
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        check_common_support(_config(hidden_act="gelu"))


def test_layer_types_are_read_or_refused() -> None:
    stated = ["sliding_attention", "full_attention"]
    assert layer_types_of(_config(num_hidden_layers=2, layer_types=stated)) == stated
    with pytest.raises(ValueError, match=r"unsupported layer type\(s\) 'chunked_attention' in layer_types"):
        layer_types_of(_config(num_hidden_layers=2, layer_types=["chunked_attention", "full_attention"]))
    with pytest.raises(ValueError, match="layer_types names 1 layers but num_hidden_layers is 2"):
        layer_types_of(_config(num_hidden_layers=2, layer_types=["full_attention"]))


def test_bidirectional_attention_is_named() -> None:
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        check_common_support(_config(use_bidirectional_attention=True))
    check_common_support(_config(use_bidirectional_attention=False))
