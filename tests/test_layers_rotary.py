"""RoPE and its scaling variants (linear, dynamic NTK, llama3, yarn) against transformers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from batchlm.attention.backend import AttentionBackend, AttentionSpec
from batchlm.layers.rope_scaling import read_rope_parameters
from batchlm.layers.rotary import RotaryEmbedding, _adjacent_heads, get_rope
from batchlm.models.loader import load_model
from batchlm.models.random_model import TINY_CONFIG, write_random_model
from models_harness import assert_greedy_matches_hf

HEAD_DIM = TINY_CONFIG["head_dim"]
# Each scaling with the config fields it needs; small limits so a short generation crosses them.
SCALINGS: dict[str, dict[str, Any]] = {
    "default": {"max_position_embeddings": 64},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.5}, "max_position_embeddings": 64},
    "dynamic": {"rope_scaling": {"rope_type": "dynamic", "factor": 3.0}, "max_position_embeddings": 16},
    "llama3": {
        # original 64: the 8 frequencies of head_dim 16 fall in all three llama3 bands.
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "max_position_embeddings": 512,
        "rope_theta": 500000.0,
    },
    "yarn": {
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        "max_position_embeddings": 128,
    },
}


def _hf_config(kind: str) -> Any:
    return AutoConfig.for_model("llama", **{**TINY_CONFIG, **SCALINGS[kind]})


@pytest.mark.parametrize("kind", ["default", "linear", "llama3", "yarn"])
def test_cos_sin_cache_matches_transformers(kind: str) -> None:
    config = _hf_config(kind)
    rope = get_rope(config, HEAD_DIM, 200)
    positions = torch.arange(200)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions[None])
    ours_cos, ours_sin = rope.cos_sin_cache.chunk(2, dim=-1)
    torch.testing.assert_close(ours_cos, cos[0, :, : HEAD_DIM // 2], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_sin, sin[0, :, : HEAD_DIM // 2], atol=1e-5, rtol=0)


def test_dynamic_ntk_matches_transformers_decoding_each_position() -> None:
    # transformers stretches the base for the longest position in a call; decoding calls it with one
    # position at a time, which is the per-position rule of our cache.
    config = _hf_config("dynamic")
    rope = get_rope(config, HEAD_DIM, 48)
    hf_rope = LlamaRotaryEmbedding(config)
    for position in (0, 15, 16, 17, 30, 47):
        cos, sin = hf_rope(torch.zeros(1), torch.tensor([[position]]))
        ours_cos, ours_sin = rope.cos_sin_cache[position].chunk(2)
        torch.testing.assert_close(ours_cos, cos[0, 0, : HEAD_DIM // 2], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_sin, sin[0, 0, : HEAD_DIM // 2], atol=1e-5, rtol=0)
    # Past the limit the base really is stretched (the cache is not just the default RoPE).
    plain = get_rope(_hf_config("default"), HEAD_DIM, 48)
    assert torch.equal(rope.cos_sin_cache[:16], plain.cos_sin_cache[:16])
    assert not torch.allclose(rope.cos_sin_cache[40], plain.cos_sin_cache[40], atol=1e-3)


def test_rotation_matches_transformers_apply_rotary_pos_emb() -> None:
    config = _hf_config("yarn")
    rope = get_rope(config, HEAD_DIM, 64)
    positions = torch.tensor([0, 5, 63, 17])
    q, k = torch.randn(4, 4, HEAD_DIM), torch.randn(4, 2, HEAD_DIM)
    ours_q, ours_k = rope(positions, q, k)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    # transformers wants [batch, heads, seq, dim].
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "dynamic", "llama3", "yarn"])
def test_scaled_model_matches_transformers(tmp_path: Path, kind: str) -> None:
    path = write_random_model(tmp_path, "llama", SCALINGS[kind], seed=11)
    loaded = load_model(path, torch.float32, torch.device("cpu"), progress=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = [5, 17, 42, 99, 3, 250, 7, 8, 9, 10]  # 10 + 16 tokens: past the dynamic limit of 16
    assert_greedy_matches_hf(loaded, hf, [prompt], 16)


def test_reads_transformers_4_rope_scaling_and_theta() -> None:
    config = SimpleNamespace(
        rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=500000.0, max_position_embeddings=64
    )
    params = read_rope_parameters(config)
    assert params["rope_type"] == "linear" and params["factor"] == 2.0 and params["rope_theta"] == 500000.0
    assert "type" not in params


def test_reads_transformers_5_rope_parameters() -> None:
    params = read_rope_parameters(_hf_config("llama3"))
    assert params["rope_type"] == "llama3" and params["rope_theta"] == 500000.0
    assert params["original_max_position_embeddings"] == 64


def test_no_rope_fields_means_default_rope() -> None:
    params = read_rope_parameters(SimpleNamespace(max_position_embeddings=64))
    assert params == {"rope_type": "default", "rope_theta": 10000.0}


def test_yarn_without_original_length_uses_the_config_limit() -> None:
    config = SimpleNamespace(rope_scaling={"rope_type": "yarn", "factor": 2.0}, max_position_embeddings=96)
    assert read_rope_parameters(config)["original_max_position_embeddings"] == 96


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ({"rope_type": "mrope", "factor": 2.0}, "unsupported RoPE scaling type 'mrope'"),
        ({"type": "su"}, "unsupported RoPE scaling type 'su'"),
    ],
)
def test_unsupported_rope_settings_are_named(scaling: dict[str, Any], message: str) -> None:
    config = SimpleNamespace(rope_scaling=scaling, max_position_embeddings=64)
    with pytest.raises(ValueError, match=message):
        read_rope_parameters(config)


def test_fused_qkv_split_rotates_exactly_like_separate_tensors() -> None:
    # q and k as views of one fused qkv output take the joint path; copies take the per-tensor one.
    rope = get_rope(_hf_config("default"), HEAD_DIM, 64)
    positions = torch.tensor([3, 0, 63, 17, 8])
    qkv = torch.randn(5, (4 + 2 + 2) * HEAD_DIM)
    q = qkv[:, : 4 * HEAD_DIM].view(5, 4, HEAD_DIM)
    k = qkv[:, 4 * HEAD_DIM : 6 * HEAD_DIM].view(5, 2, HEAD_DIM)
    assert _adjacent_heads(q, k) is not None and _adjacent_heads(q.clone(), k.clone()) is None
    joint_q, joint_k = rope(positions, q, k)
    alone_q, alone_k = rope(positions, q.clone(), k.clone())
    assert torch.equal(joint_q, alone_q) and torch.equal(joint_k, alone_k)
    assert joint_q.shape == q.shape and joint_k.shape == k.shape
    # The inputs are left as they were (the rotation writes a new tensor).
    assert torch.equal(qkv[:, : 4 * HEAD_DIM].view(5, 4, HEAD_DIM), q)
    # Rotating by position 0 is the identity.
    assert torch.equal(joint_q[1], q[1]) and torch.equal(joint_k[1], k[1])


def test_one_token_split_rotates_jointly() -> None:
    # One token (a single-stream decode step): view() gives q and k different row strides, which
    # must not send them down the per-tensor path.
    rope = get_rope(_hf_config("default"), HEAD_DIM, 64)
    qkv = torch.randn(1, (4 + 2 + 2) * HEAD_DIM)
    q, k, _ = qkv.split([4 * HEAD_DIM, 2 * HEAD_DIM, 2 * HEAD_DIM], dim=-1)
    q, k = q.view(-1, 4, HEAD_DIM), k.view(-1, 2, HEAD_DIM)
    both = _adjacent_heads(q, k)
    assert both is not None and both.shape == (1, 6, HEAD_DIM)
    assert torch.equal(both[:, 4:], k) and torch.equal(both[:, :4], q)
    joint_q, joint_k = rope(torch.tensor([9]), q, k)
    alone_q, alone_k = rope(torch.tensor([9]), q.clone(), k.clone())
    assert torch.equal(joint_q, alone_q) and torch.equal(joint_k, alone_k)


def test_key_not_following_query_takes_the_separate_path() -> None:
    rope = get_rope(_hf_config("default"), HEAD_DIM, 64)
    positions = torch.tensor([1, 2])
    qkv = torch.randn(2, 8 * HEAD_DIM)
    q = qkv[:, : 4 * HEAD_DIM].view(2, 4, HEAD_DIM)
    v_as_key = qkv[:, 6 * HEAD_DIM :].view(2, 2, HEAD_DIM)  # same storage, but not adjacent to q
    assert _adjacent_heads(q, v_as_key) is None
    ours_q, ours_k = rope(positions, q, v_as_key)
    expected_q, expected_k = rope(positions, q.clone(), v_as_key.clone())
    assert torch.equal(ours_q, expected_q) and torch.equal(ours_k, expected_k)


def test_only_a_whole_head_on_a_gpu_may_be_rotated_by_a_fused_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import batchlm.layers.rotary as rotary

    whole = RotaryEmbedding(16, torch.randn(64, 16))
    partial = RotaryEmbedding(16, torch.randn(64, 8))  # Phi-3 style: half the head turns
    # Phi-3-mini's head of 96: the kernels pad it to a power of two.
    not_power_of_two = RotaryEmbedding(96, torch.randn(64, 96))
    query = torch.randn(2, 4, 16)
    assert whole.fusable_table(query) is None  # a CPU tensor: no fused kernels
    monkeypatch.setattr(rotary, "fused_ops_for", lambda x: object())
    assert whole.fusable_table(query) is whole.cos_sin_cache
    assert partial.fusable_table(query) is None
    assert not_power_of_two.fusable_table(torch.randn(2, 4, 96)) is not_power_of_two.cos_sin_cache


def test_a_backend_that_does_not_fold_rope_rotates_then_attends() -> None:
    rope = get_rope(_hf_config("default"), HEAD_DIM, 64)
    seen: dict[str, torch.Tensor] = {}

    class Recording(AttentionBackend):
        def forward(self, query, key, value, kv_cache, meta, spec, sinks=None):  # type: ignore[no-untyped-def]
            seen.update(query=query, key=key, value=value)
            return query

    positions = torch.tensor([5, 9])
    q, k, v = torch.randn(2, 4, HEAD_DIM), torch.randn(2, 2, HEAD_DIM), torch.randn(2, 2, HEAD_DIM)
    expected_q, expected_k = rope(positions, q.clone(), k.clone())
    Recording().forward_rotating(positions, rope, q, k, v, torch.empty(0), None, AttentionSpec(1.0))  # type: ignore[arg-type]
    assert torch.equal(seen["query"], expected_q) and torch.equal(seen["key"], expected_k)
    assert seen["value"] is v
