"""Tests for batchlm.backends.mlx.loader: mlx-community style 4-bit checkpoints, mlx-lm adapters, dtype,
context limits, and clear refusals of what the MLX backend cannot do."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import batchlm.backends.mlx  # noqa: F401  (first: it imports mlx-lm, keeping the open-file limit)

mx = pytest.importorskip("mlx.core")

import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import load_model as mlx_load_model  # noqa: E402

from batchlm.backends.mlx.loader import (  # noqa: E402
    FALLBACK_MAX_MODEL_LEN,
    check_config,
    ignored_settings,
    load_model,
    resolve_max_model_len,
    warn_ignored_settings,
)
from batchlm.config import EngineConfig  # noqa: E402

PROMPT = [[0, 11, 12, 13, 14, 15]]
LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}


def logits_of(model: nn.Module) -> mx.array:
    return model(mx.array(PROMPT))[0, -1]  # [V]


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-bit copy of the tiny model written by mlx-lm's convert, as mlx-community checkpoints are."""
    from mlx_lm import convert

    target = tmp_path_factory.mktemp("quantized") / "tiny-4bit"
    convert(str(tiny_model_dir("llama")), str(target), quantize=True, q_group_size=32, q_bits=4)
    return target


@pytest.fixture(scope="module")
def adapter(
    tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, mx.array]:
    """An mlx-lm LoRA adapter directory with non-zero B matrices, and the logits the adapted model gives."""
    model, _ = mlx_load_model(tiny_model_dir("llama"))
    linear_to_lora_layers(model, 2, LORA)
    mx.random.seed(0)
    lora = {
        name: (mx.random.normal(value.shape) * 0.05 if name.endswith("lora_b") else value)
        for name, value in tree_flatten(model.parameters())
        if name.endswith(("lora_a", "lora_b"))
    }
    model.load_weights(list(lora.items()), strict=False)
    directory = tmp_path_factory.mktemp("adapter")
    mx.save_safetensors(str(directory / "adapters.safetensors"), lora)
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": LORA}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory, logits_of(model)


def test_four_bit_checkpoint_loads_quantized_and_stays_close(
    quantized_dir: Path, tiny_model_dir: Callable[..., Path]
) -> None:
    loaded = load_model(EngineConfig(model=str(quantized_dir)), quantized_dir)
    assert loaded.quantized
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in loaded.model.named_modules())
    full = load_model(EngineConfig(), tiny_model_dir("llama"))
    assert not full.quantized
    error = mx.abs(logits_of(loaded.model) - logits_of(full.model)).max().item()
    assert 0 < error < 0.5


def test_adapter_is_applied(adapter: tuple[Path, mx.array], tiny_model_dir: Callable[..., Path]) -> None:
    directory, expected = adapter
    base = load_model(EngineConfig(), tiny_model_dir("llama"))
    adapted = load_model(EngineConfig(adapter_path=str(directory)), tiny_model_dir("llama"))
    assert mx.allclose(logits_of(adapted.model), expected, atol=1e-5).item()
    assert not mx.allclose(logits_of(base.model), expected, atol=1e-3).item()


def test_adapter_on_a_quantized_model(adapter: tuple[Path, mx.array], quantized_dir: Path) -> None:
    directory, _ = adapter
    base = load_model(EngineConfig(), quantized_dir)
    adapted = load_model(EngineConfig(adapter_path=str(directory)), quantized_dir)
    assert not mx.allclose(logits_of(adapted.model), logits_of(base.model), atol=1e-3).item()


def test_peft_adapters_are_refused_by_name(tmp_path: Path, tiny_model_dir: Callable[..., Path]) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="PEFT"):
        load_model(EngineConfig(adapter_path=str(tmp_path)), tiny_model_dir("llama"))


def test_missing_adapter_config_is_named(tmp_path: Path, tiny_model_dir: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        load_model(EngineConfig(adapter_path=str(tmp_path)), tiny_model_dir("llama"))


def test_dtype_casts_floating_weights(tiny_model_dir: Callable[..., Path]) -> None:
    loaded = load_model(EngineConfig(dtype="float16"), tiny_model_dir("llama"))
    dtypes = {value.dtype for _, value in tree_flatten(loaded.model.parameters())}
    assert dtypes == {mx.float16}


def test_quantized_weights_stay_packed_under_a_dtype_cast(quantized_dir: Path) -> None:
    loaded = load_model(EngineConfig(dtype="bfloat16"), quantized_dir)
    params = dict(tree_flatten(loaded.model.parameters()))
    assert params["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert params["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16


def test_model_facts_come_from_the_config(tiny_model_dir: Callable[..., Path]) -> None:
    loaded = load_model(EngineConfig(), tiny_model_dir("llama"))
    assert (loaded.max_model_len, loaded.vocab_size) == (512, 2048)
    assert load_model(EngineConfig(max_model_len=128), tiny_model_dir("llama")).max_model_len == 128


def test_max_model_len_falls_back_when_the_model_states_none() -> None:
    assert resolve_max_model_len(EngineConfig(), {"vocab_size": 10}) == FALLBACK_MAX_MODEL_LEN
    assert resolve_max_model_len(EngineConfig(), {"text_config": {"max_position_embeddings": 99}}) == 99


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"tensor_parallel_size": 2}, "tensor_parallel_size"),
        ({"device": "cuda"}, "device"),
        ({"dtype": "float64"}, "dtype"),
        ({"load_format": "dummy"}, "load_format"),
        ({"kv_cache_dtype": "fp16"}, "kv_cache_dtype"),
        ({"quantization": "int8"}, "quantization"),
    ],
)
def test_unsupported_settings_are_refused_by_name(change: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        check_config(EngineConfig(**change))  # type: ignore[arg-type]


def test_the_torch_engines_settings_it_ignores_are_named(caplog: pytest.LogCaptureFixture) -> None:
    assert ignored_settings(EngineConfig()) == []
    assert ignored_settings(EngineConfig(speculative="off", async_scheduling="auto")) == []
    config = EngineConfig(seed=7, speculative="ngram", async_scheduling="on", enforce_eager=True)
    assert sorted(ignored_settings(config)) == ["async_scheduling", "enforce_eager", "seed", "speculative"]
    with caplog.at_level("WARNING", logger="batchlm.backends.mlx.loader"):
        warn_ignored_settings(config)
    assert "seed=7" in caplog.text and "speculative='ngram'" in caplog.text


# transformers 5's form of RoPE scaling (config.json's rope_parameters, no rope_scaling).
SCALED_ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    },
    "yarn": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "rope_theta": 10000.0,
    },
}


@pytest.mark.parametrize("kind", sorted(SCALED_ROPE))
def test_rope_scaling_in_rope_parameters_gives_transformers_logits(
    kind: str, tiny_model_dir: Callable[..., Path]
) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama", rope_parameters=SCALED_ROPE[kind])
    prompt = list(range(10, 200))
    loaded = load_model(EngineConfig(), model_dir)
    ours = np.array(loaded.model(mx.array([prompt]))[0].astype(mx.float32))  # [T, V]
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0].numpy()  # [T, V]
    assert np.abs(ours - expected).max() < 1e-4


@pytest.mark.parametrize(("kind", "limit"), [("linear", 1024), ("llama3", 512), ("yarn", 512)])
def test_max_model_len_is_the_rope_scaled_context_as_on_torch(
    kind: str, limit: int, tiny_model_dir: Callable[..., Path]
) -> None:
    # The torch backend's limit: models/hf_config.context_length (512 positions in TINY_CONFIG).
    model_dir = tiny_model_dir("llama", rope_parameters=SCALED_ROPE[kind])
    assert load_model(EngineConfig(), model_dir).max_model_len == limit
    old_form = {"max_position_embeddings": 4096, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    assert resolve_max_model_len(EngineConfig(), old_form) == 16384


@pytest.mark.parametrize("nested", [False, True])
def test_gemma_3_s_stated_context_is_not_scaled_again(nested: bool) -> None:
    # As transformers writes google/gemma-3-4b-it: 131072 positions is the context the linear x8
    # scaling of its global layers gives (the torch backend, through transformers' config, says so too).
    text = {
        "model_type": "gemma3_text",
        "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    }
    config = {"model_type": "gemma3", "text_config": text} if nested else text
    assert resolve_max_model_len(EngineConfig(), config) == 131072


def test_max_model_len_above_the_models_context_is_refused_as_on_torch() -> None:
    with pytest.raises(ValueError, match="--max-model-len 1000 exceeds the model's context length 512"):
        resolve_max_model_len(EngineConfig(max_model_len=1000), {"max_position_embeddings": 512})


# Phi-3's LongRoPE over a pretraining length of 16 (head_dim 16: 8 frequencies).
PHI3_LONGROPE = {
    "original_max_position_embeddings": 16,
    "pad_token_id": 0,
    "rope_parameters": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0],
        "long_factor": [1.5, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 40.0],
    },
}


def test_longrope_turns_with_the_long_factors_throughout_and_is_named(
    tiny_model_dir: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    # mlx-lm's SuScaledRoPE (kept as it is): a prompt within the original length gets other logits than
    # transformers', which turns it with the short factors; a longer one the same.
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("phi3", seed=9, head_dim=16, **PHI3_LONGROPE)
    with caplog.at_level("WARNING", logger="batchlm.backends.mlx.loader"):
        loaded = load_model(EngineConfig(), model_dir)
    assert "LongRoPE's long factors" in caplog.text and "up to 16 tokens" in caplog.text
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for length, differs in ((10, True), (30, False)):
        prompt = list(range(20, 20 + length))
        ours = torch.tensor(loaded.model(mx.array([prompt]))[0, -1].astype(mx.float32).tolist())
        with torch.no_grad():
            theirs = hf(torch.tensor([prompt]), use_cache=False).logits[0, -1]
        assert bool((ours - theirs).abs().max() > 1e-3) == differs
    caplog.clear()
    with caplog.at_level("WARNING", logger="batchlm.backends.mlx.loader"):
        load_model(EngineConfig(), tiny_model_dir("phi3", pad_token_id=0))
    assert "LongRoPE" not in caplog.text
