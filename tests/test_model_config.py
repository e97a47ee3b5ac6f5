"""ModelConfig: what read_model_config makes of each family's transformers config (per-layer specs)."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoConfig

from batchlm.models.model_config import read_model_config
from batchlm.models.random_model import TINY_CONFIG


def hf(model_type: str, architecture: str, **fields: Any) -> Any:
    config = AutoConfig.for_model(model_type, **{**TINY_CONFIG, **fields})
    config.architectures = [architecture]
    return config


def windows(config: Any) -> list[int | None]:
    return [layer.attention.sliding_window for layer in read_model_config(config).layers]


def test_llama_layers_attend_to_everything_with_the_head_dim_scale() -> None:
    config = read_model_config(hf("llama", "LlamaForCausalLM"))
    assert config.num_layers == len(config.layers) == 2
    assert {layer.attention.scale for layer in config.layers} == {16**-0.5}
    assert config.sliding_window is None and config.final_logit_softcap is None
    assert config.max_model_len == 512 and config.layers[0].rope.rotary_dim == 16


def test_a_sliding_window_is_per_layer_and_never_caps_the_context() -> None:
    mistral = hf("mistral", "MistralForCausalLM", sliding_window=64)
    assert windows(mistral) == [64, 64]
    assert read_model_config(mistral).max_model_len == 512
    qwen2 = hf("qwen2", "Qwen2ForCausalLM", sliding_window=64, use_sliding_window=True, max_window_layers=1)
    assert windows(qwen2) == [None, 64]
    assert windows(hf("qwen2", "Qwen2ForCausalLM", sliding_window=64)) == [None, None]


def test_gemma2_soft_caps_and_scales_by_query_pre_attn_scalar() -> None:
    config = read_model_config(
        hf("gemma2", "Gemma2ForCausalLM", num_hidden_layers=4, sliding_window=8, query_pre_attn_scalar=64)
    )
    assert [layer.attention.sliding_window for layer in config.layers] == [8, None, 8, None]
    assert {layer.attention.scale for layer in config.layers} == {64**-0.5}
    assert {layer.attention.logit_softcap for layer in config.layers} == {50.0}
    assert config.final_logit_softcap == 30.0 and config.hidden_act == "gelu_pytorch_tanh"


def test_gemma3_local_layers_use_their_own_rope_base() -> None:
    text = hf(
        "gemma3_text", "Gemma3ForCausalLM", num_hidden_layers=6, sliding_window=8, rope_local_base_freq=500.0
    )
    config = read_model_config(text)
    assert [layer.attention.sliding_window for layer in config.layers] == [8] * 5 + [None]
    thetas = [layer.rope.params["rope_theta"] for layer in config.layers]
    assert thetas == [500.0] * 5 + [1_000_000.0]


def test_gemma3_linear_rope_scaling_keeps_the_stated_context() -> None:
    # Gemma 3 4B+: max_position_embeddings already is the scaled length (16k x 8).
    linear = {"rope_type": "linear", "factor": 8.0}
    config = read_model_config(
        hf("gemma3_text", "Gemma3ForCausalLM", num_hidden_layers=6, rope_scaling=linear)
    )
    assert config.max_model_len == 512
    assert [layer.rope.params["rope_type"] for layer in config.layers] == ["default"] * 5 + ["linear"]


def test_a_multimodal_config_reads_its_text_config() -> None:
    from transformers import Gemma3Config

    text = {**TINY_CONFIG, "num_hidden_layers": 3, "sliding_window": 8}
    outer = Gemma3Config(
        text_config=text,
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
    )
    outer.architectures = ["Gemma3ForConditionalGeneration"]
    config = read_model_config(outer)
    assert config.architecture == "Gemma3ForConditionalGeneration"
    assert (config.hidden_size, config.num_layers, config.vocab_size) == (64, 3, 320)


def test_partial_rotary_width() -> None:
    phi3 = hf("phi3", "Phi3ForCausalLM", partial_rotary_factor=0.5, pad_token_id=0)
    assert {layer.rope.rotary_dim for layer in read_model_config(phi3).layers} == {8}
    with pytest.raises(ValueError, match="rotary width"):
        read_model_config(hf("phi3", "Phi3ForCausalLM", partial_rotary_factor=0.05, pad_token_id=0))


@pytest.mark.parametrize("kv_heads", [8, 3])
def test_query_heads_that_do_not_share_their_kv_heads_in_equal_groups_are_named(kv_heads: int) -> None:
    config = hf("llama", "LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=kv_heads)
    with pytest.raises(
        ValueError,
        match=rf"num_attention_heads \(4\) is not a multiple of its num_key_value_heads \({kv_heads}\)",
    ):
        read_model_config(config)
