"""load_model: single and sharded checkpoints, dtype, overrides, random weights, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchlm.models.loader import LoadedModel, load_model, model_shape
from batchlm.models.random_model import write_random_model
from batchlm.models.registry import get_model_class
from batchlm.parallel.group import TensorParallelGroup
from models_harness import Chunk, make_kv_caches, run_step

CPU = torch.device("cpu")
PROMPT = [5, 17, 42, 99, 3, 250, 7]


def _load(path: Path, dtype: torch.dtype = torch.float32, **kwargs) -> LoadedModel:
    return load_model(path, dtype, CPU, progress=False, **kwargs)


def _logits(loaded: LoadedModel) -> torch.Tensor:
    return run_step(loaded.model, make_kv_caches(loaded, 2), [Chunk(PROMPT, 0, [0, 1])])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("llama"), "llama", seed=12)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_sharded_checkpoint_loads_like_a_single_file(model_dir: Path, tmp_path: Path) -> None:
    sharded = write_random_model(tmp_path, "llama", seed=12, max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    single, multi = _load(model_dir), _load(sharded)
    for (name, a), (_, b) in zip(
        single.model.state_dict().items(), multi.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(_logits(single), _logits(multi), rtol=0, atol=0)


def test_loaded_model_reports_shape_dtype_and_device(model_dir: Path) -> None:
    loaded = _load(model_dir)
    assert loaded.shape == model_shape(loaded.config)
    s = loaded.shape
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size, s.vocab_size, s.max_model_len) == (
        2, 4, 2, 16, 64, 320, 512
    )  # fmt: skip
    assert loaded.model_dir == model_dir and loaded.device == CPU and loaded.dtype == torch.float32
    assert not loaded.model.training


def test_shape_per_rank_under_tensor_parallelism(model_dir: Path) -> None:
    config = _load(model_dir).config
    two = model_shape(config, TensorParallelGroup(1, 2))
    assert (two.num_heads, two.num_kv_heads, two.vocab_size) == (2, 1, 320)
    four = model_shape(config, TensorParallelGroup(3, 4))
    assert (four.num_heads, four.num_kv_heads) == (1, 1)  # 2 KV heads replicated over 4 ranks


def test_dtype_cast_keeps_rope_cache_in_float32(model_dir: Path) -> None:
    loaded = _load(model_dir, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    rope = loaded.model.model.layers[0].self_attn.rotary_emb
    assert rope.cos_sin_cache.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32  # the loader restored the global default
    reference = torch.log_softmax(_logits(_load(model_dir)), -1)
    torch.testing.assert_close(torch.log_softmax(_logits(loaded), -1), reference, atol=0.1, rtol=0)


def test_hf_overrides_change_the_config(model_dir: Path) -> None:
    loaded = _load(model_dir, hf_overrides={"max_position_embeddings": 100, "rms_norm_eps": 1e-3})
    assert loaded.shape.max_model_len == 100
    assert loaded.model.model.norm.eps == 1e-3


def test_random_weights_need_only_config_json(model_dir: Path, tmp_path: Path) -> None:
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    first = _load(tmp_path, random_weights=True, seed=1)
    again = _load(tmp_path, random_weights=True, seed=1)
    other = _load(tmp_path, random_weights=True, seed=2)
    torch.testing.assert_close(_logits(first), _logits(again), rtol=0, atol=0)
    assert not torch.allclose(_logits(first), _logits(other))
    assert torch.all(first.model.model.norm.weight == 1.0)
    assert torch.isfinite(_logits(first)).all()


def test_tied_checkpoint_with_a_stored_lm_head_is_accepted(tmp_path: Path) -> None:
    path = write_random_model(tmp_path, "llama", {"tie_word_embeddings": True}, seed=13)
    _edit_weights(path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    loaded = _load(path)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_unsupported_architecture_is_named_with_ours_listed(model_dir: Path, tmp_path: Path) -> None:
    path = _copy(model_dir, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"unsupported model architecture 'GPT2LMHeadModel'.*LlamaForCausalLM.*Qwen3ForCausalLM",
    ):
        _load(path)
    with pytest.raises(ValueError, match="'Foo'"):
        get_model_class("Foo")


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no config\.json"):
        _load(tmp_path)


def test_missing_tensor_is_named(model_dir: Path, tmp_path: Path) -> None:
    path = _copy(model_dir, tmp_path / "m")
    _edit_weights(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*'model.layers.1.self_attn.k_proj.weight'"):
        _load(path)


def test_unexpected_tensor_is_named(model_dir: Path, tmp_path: Path) -> None:
    path = _copy(model_dir, tmp_path / "m")
    _edit_weights(path, lambda t: t.__setitem__("model.layers.0.mlp.extra_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(ValueError, match=r"unexpected tensor.*'model.layers.0.mlp.extra_proj.weight'"):
        _load(path)


def test_shape_mismatch_names_tensor_and_shapes(model_dir: Path, tmp_path: Path) -> None:
    path = _copy(model_dir, tmp_path / "m")
    _edit_weights(path, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(128, 60)))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight'.*\[128, 64\].*\[128, 60\]"):
        _load(path)


def test_no_safetensors_files(model_dir: Path, tmp_path: Path) -> None:
    path = _copy(model_dir, tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*.safetensors weight files"):
        _load(path)


def test_bin_only_checkpoint_asks_for_safetensors(model_dir: Path, tmp_path: Path) -> None:
    path = _copy(model_dir, tmp_path / "m")
    torch.save(load_file(str(path / "model.safetensors")), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"only PyTorch .bin/.pt weights; batchlm loads safetensors only"):
        _load(path)


def test_missing_shard_file_is_named(tmp_path: Path) -> None:
    path = write_random_model(tmp_path, "llama", seed=12, max_shard_size="40KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"missing: {shard.name}"):
        _load(path)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"\x00" * 7, id="shorter-than-a-header"),
        pytest.param(lambda data: b"not a safetensors file" * 8, id="not-safetensors"),
    ],
)
def test_a_damaged_safetensors_file_is_named(model_dir: Path, tmp_path: Path, damage) -> None:
    path = _copy(model_dir, tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file"):
        _load(path)


def test_a_damaged_shard_index_is_named(tmp_path: Path) -> None:
    path = write_random_model(tmp_path, "llama", seed=12, max_shard_size="40KB")
    index = path / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(ValueError, match=f"{index} is not valid JSON"):
        _load(path)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=f'{index} has no "weight_map" object'):
        _load(path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"], ids=["invalid", "not-an-object"])
def test_a_config_json_that_is_not_a_json_object_is_named(model_dir: Path, tmp_path: Path, text: str) -> None:
    path = _copy(model_dir, tmp_path / "m")
    (path / "config.json").write_text(text)
    with pytest.raises(
        ValueError, match=f"{path / 'config.json'} (is not valid JSON|must hold a JSON object)"
    ):
        _load(path)


def test_adapter_with_random_weights_is_refused(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="cannot be merged into random weights"):
        _load(model_dir, random_weights=True, adapter_path="/nonexistent")
