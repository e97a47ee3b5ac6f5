"""PEFT LoRA adapters merged at load: W + scale * B @ A per target, and clear refusals."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from batchlm.models.loader import LoadedModel, load_model
from batchlm.models.random_model import TINY_CONFIG, write_random_model
from models_harness import (
    Chunk,
    greedy_generate,
    hf_gemma3_multimodal,
    hf_greedy,
    make_kv_caches,
    run_ranks,
    run_step,
    thread_groups,
)

CPU = torch.device("cpu")
RANK, ALPHA = 4, 8
# HF module name -> (out_features, in_features) in the tiny Llama (hidden 64, 4 x 16 q, 2 x 16 kv, mlp 128).
TARGETS = {
    "model.layers.0.self_attn.q_proj": (64, 64),
    "model.layers.0.self_attn.v_proj": (32, 64),
    "model.layers.1.mlp.gate_proj": (128, 64),
    "model.layers.1.mlp.down_proj": (64, 128),
}


def write_adapter(
    path: Path,
    targets: dict[str, tuple[int, int]] = TARGETS,
    config: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT-format adapter on disk; returns {module: (A, B)}."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors, pairs = {}, {}
    for module, (out_features, in_features) in targets.items():
        a = torch.randn(RANK, in_features, generator=gen) * 0.3
        b = torch.randn(out_features, RANK, generator=gen) * 0.3
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        pairs[module] = (a, b)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets}),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "fan_in_fan_out": False,
        **(config or {}),
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    return pairs


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("base"), "llama", seed=20)


def _load(path: Path, adapter: Path | None = None) -> LoadedModel:
    return load_model(
        path, torch.float32, CPU, adapter_path=str(adapter) if adapter else None, progress=False
    )


def _base_tensor(base_dir: Path, module: str) -> torch.Tensor:
    return load_file(str(base_dir / "model.safetensors"))[f"{module}.weight"]


def test_merged_weights_equal_base_plus_scaled_delta(base_dir: Path, tmp_path: Path) -> None:
    pairs = write_adapter(tmp_path)
    loaded = _load(base_dir, tmp_path)
    scale = ALPHA / RANK

    def expected(module: str) -> torch.Tensor:
        a, b = pairs[module]
        return _base_tensor(base_dir, module) + scale * b @ a

    qkv = loaded.model.model.layers[0].self_attn.qkv_proj.weight
    torch.testing.assert_close(qkv[:64], expected("model.layers.0.self_attn.q_proj"))
    torch.testing.assert_close(
        qkv[64:96], _base_tensor(base_dir, "model.layers.0.self_attn.k_proj"), rtol=0, atol=0
    )
    torch.testing.assert_close(qkv[96:], expected("model.layers.0.self_attn.v_proj"))
    mlp = loaded.model.model.layers[1].mlp
    torch.testing.assert_close(mlp.gate_up_proj.weight[:128], expected("model.layers.1.mlp.gate_proj"))
    torch.testing.assert_close(
        mlp.gate_up_proj.weight[128:], _base_tensor(base_dir, "model.layers.1.mlp.up_proj"), rtol=0, atol=0
    )
    torch.testing.assert_close(mlp.down_proj.weight, expected("model.layers.1.mlp.down_proj"))


def test_rslora_scales_by_alpha_over_sqrt_rank(base_dir: Path, tmp_path: Path) -> None:
    module = "model.layers.1.mlp.down_proj"
    pairs = write_adapter(tmp_path, {module: TARGETS[module]}, {"use_rslora": True})
    loaded = _load(base_dir, tmp_path)
    a, b = pairs[module]
    expected = _base_tensor(base_dir, module) + ALPHA / math.sqrt(RANK) * b @ a
    torch.testing.assert_close(loaded.model.model.layers[1].mlp.down_proj.weight, expected)


def test_adapted_model_matches_transformers_with_merged_weights(base_dir: Path, tmp_path: Path) -> None:
    pairs = write_adapter(tmp_path)
    adapted, base = _load(base_dir, tmp_path), _load(base_dir)
    prompt = [5, 17, 42, 99, 3, 250, 7]
    logits = [run_step(m.model, make_kv_caches(m, 2), [Chunk(prompt, 0, [0, 1])]) for m in (adapted, base)]
    assert not torch.allclose(logits[0], logits[1], atol=1e-2)
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            hf.get_submodule(module).weight += ALPHA / RANK * b @ a
    ours, our_logprobs = greedy_generate(adapted, prompt, 12)
    theirs, their_logprobs = hf_greedy(hf, prompt, 12)
    assert ours == theirs
    torch.testing.assert_close(our_logprobs, their_logprobs, atol=1e-4, rtol=0)


def test_adapter_for_a_module_the_model_lacks(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path, {"model.layers.7.self_attn.q_proj": (64, 64)})
    with pytest.raises(ValueError, match=r"does not match the base model.*model.layers.7.self_attn.q_proj"):
        _load(base_dir, tmp_path)


def test_adapter_with_mismatched_shapes(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path, {"model.layers.0.self_attn.q_proj": (64, 48)})
    with pytest.raises(
        ValueError, match=r"does not match the base model.*q_proj.weight is \[64, 64\].*\[64, 48\]"
    ):
        _load(base_dir, tmp_path)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, r"use_dora is set but model\.layers\.\d\.\w+\.\w+_proj has no lora_magnitude_vector"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        # PEFT writes an alpha_pattern beside the expert parameters it adapts: the parameters are what to name.
        (
            {"target_parameters": ["gate_up_proj"], "alpha_pattern": {".*gate_up_proj": 16}},
            "target_parameters",
        ),
        ({"peft_type": "IA3"}, "IA3 adapter; only LoRA"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"alora_invocation_tokens": [5, 6]}, "activated LoRA"),
        # LoRA variants that save lora_A/lora_B but compute otherwise with them.
        ({"use_bdlora": {"target_modules_bd_a": ["q_proj"], "nblocks": 2}}, "BD-LoRA"),
        ({"kasa_config": {}}, None),  # an empty config is PEFT's "unused"
        ({"kasa_config": {"svd_niter": 2}}, "KaSA"),
        ({"arrow_config": {"top_k": 3}}, "Arrow"),
        ({"monteclora_config": {"dirichlet_prior": 1.0}}, "MonteCLoRA"),
        # A setting batchlm does not know may change the math: refused, named with its value.
        ({"use_newlora": True, "lora_scaling_mode": "new"}, r"sets lora_scaling_mode='new', use_newlora=True, unknown"),
        ({"use_newlora": False, "newlora_config": None}, None),
        ({"mixing_config": {"a": 1}}, r"sets mixing_config=\{'a': 1\}, unknown"),
        ({"unsloth_fixed": True, "trainer_notes": "run 7"}, None),  # bookkeeping: ignored, with a warning
        ({"velora_config": {"rank": 4}, "ensure_weight_tying": True, "megatron_core": "x"}, None),
    ],
)  # fmt: skip
def test_unsupported_adapter_features_are_named(
    base_dir: Path, tmp_path: Path, config: dict, message: str | None
) -> None:
    write_adapter(tmp_path, config=config)
    if message is None:
        _load(base_dir, tmp_path)  # settings that leave the math alone are accepted
        return
    with pytest.raises(ValueError, match=message):
        _load(base_dir, tmp_path)


def test_unknown_bookkeeping_settings_are_named_in_a_warning(
    base_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_adapter(tmp_path, config={"trainer_notes": "run 7", "unsloth_version": "2026.1"})
    with caplog.at_level(logging.WARNING, logger="batchlm.models.lora"):
        _load(base_dir, tmp_path)
    assert "ignoring adapter_config.json settings unknown to batchlm: trainer_notes='run 7'" in caplog.text


def _add_tensors(adapter: Path, extra: dict[str, torch.Tensor]) -> None:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({**tensors, **extra}, str(adapter / "adapter_model.safetensors"))


def test_tensors_of_other_methods_are_refused(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path)
    _add_tensors(tmp_path, {"base_model.model.model.layers.0.self_attn.q_proj.lora_diag": torch.ones(RANK)})
    with pytest.raises(ValueError, match=r"unsupported tensor '.*q_proj\.lora_diag'"):
        _load(base_dir, tmp_path)


def test_tensors_without_peft_prefix_are_named(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path)
    _add_tensors(tmp_path, {"model.layers.0.self_attn.k_proj.lora_A.weight": torch.ones(RANK, 64)})
    with pytest.raises(
        ValueError, match=r"'model.layers.0.self_attn.k_proj.lora_A.weight' is not named as PEFT"
    ):
        _load(base_dir, tmp_path)


def _merged_hf(base: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """transformers' model of `base` with B @ A added to each module's weight (PEFT's merge)."""
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            hf.get_submodule(module).weight += ALPHA / RANK * b @ a
    return hf


def _assert_generates_as(loaded: LoadedModel, hf: Any) -> None:
    prompt = [5, 17, 42, 99, 3, 250, 7]
    ours, our_logprobs = greedy_generate(loaded, prompt, 12)
    theirs, their_logprobs = hf_greedy(hf, prompt, 12)
    assert ours == theirs
    torch.testing.assert_close(our_logprobs, their_logprobs, atol=1e-4, rtol=0)


def test_dora_merges_as_peft_does(base_dir: Path, tmp_path: Path) -> None:
    # DoRA: W' = m * (W + s B A) / ||W + s B A||, the norm taken over each output row.
    pairs = write_adapter(tmp_path, config={"use_dora": True})
    gen = torch.Generator().manual_seed(7)
    magnitudes = {module: torch.rand(out, generator=gen) + 0.5 for module, (out, _) in TARGETS.items()}
    _add_tensors(tmp_path, {f"base_model.model.{m}.lora_magnitude_vector": v for m, v in magnitudes.items()})
    hf = _merged_hf(base_dir, pairs)
    with torch.no_grad():
        for module, magnitude in magnitudes.items():
            weight = hf.get_submodule(module).weight
            weight *= (magnitude / weight.norm(dim=1))[:, None]
    _assert_generates_as(_load(base_dir, tmp_path), hf)


def test_dora_adapter_under_tensor_parallelism(base_dir: Path, tmp_path: Path) -> None:
    # DoRA's row norms span the whole weight: the merge must precede the split into rank shares.
    write_adapter(tmp_path, config={"use_dora": True, "modules_to_save": ["lm_head"]})
    gen = torch.Generator().manual_seed(8)
    extra = {
        f"base_model.model.{m}.lora_magnitude_vector": torch.rand(out, generator=gen) + 0.5
        for m, (out, _) in TARGETS.items()
    }
    extra["base_model.model.lm_head.weight"] = torch.randn(320, 64, generator=gen) * 0.2
    _add_tensors(tmp_path, extra)
    tokens, logprobs = greedy_generate(_load(base_dir, tmp_path), [5, 17, 42, 99], 8)
    groups = thread_groups(2)
    ranks = [
        load_model(base_dir, torch.float32, CPU, adapter_path=str(tmp_path), progress=False, tp=group)
        for group in groups
    ]
    for rank_tokens, rank_logprobs in run_ranks(
        lambda rank: greedy_generate(ranks[rank], [5, 17, 42, 99], 8), 2
    ):
        assert rank_tokens == tokens
        torch.testing.assert_close(rank_logprobs, logprobs, atol=1e-4, rtol=0)


def test_dora_magnitudes_are_checked(base_dir: Path, tmp_path: Path) -> None:
    module = "model.layers.0.self_attn.v_proj"
    write_adapter(tmp_path, {module: TARGETS[module]})
    _add_tensors(tmp_path, {f"base_model.model.{module}.lora_magnitude_vector": torch.ones(32)})
    with pytest.raises(ValueError, match=r"v_proj has a DoRA lora_magnitude_vector but use_dora is not set"):
        _load(base_dir, tmp_path)
    write_adapter(tmp_path, {module: TARGETS[module]}, {"use_dora": True})
    _add_tensors(tmp_path, {f"base_model.model.{module}.lora_magnitude_vector": torch.ones(64)})
    with pytest.raises(ValueError, match=r"v_proj's lora_magnitude_vector is \[64\]; DoRA .* is \[32\]"):
        _load(base_dir, tmp_path)


def test_embedding_lora_merges_as_peft_does(base_dir: Path, tmp_path: Path) -> None:
    # PEFT keeps an embedding's factors as lora_embedding_A [r, vocab] and lora_embedding_B
    # [hidden, r]; its delta is (B @ A).T.
    module = "model.layers.0.self_attn.q_proj"
    pairs = write_adapter(tmp_path, {module: TARGETS[module]})
    gen = torch.Generator().manual_seed(3)
    emb_a, emb_b = torch.randn(RANK, 320, generator=gen) * 0.3, torch.randn(64, RANK, generator=gen) * 0.3
    prefix = "base_model.model.model.embed_tokens"
    _add_tensors(tmp_path, {f"{prefix}.lora_embedding_A": emb_a, f"{prefix}.lora_embedding_B": emb_b})
    hf = _merged_hf(base_dir, pairs)
    with torch.no_grad():
        hf.model.embed_tokens.weight += ALPHA / RANK * (emb_b @ emb_a).T
    _assert_generates_as(_load(base_dir, tmp_path), hf)


def test_modules_to_save_replace_the_checkpoints_tensors(base_dir: Path, tmp_path: Path) -> None:
    # PEFT saves a module of modules_to_save whole, as base_model.model.<module>.weight.
    module = "model.layers.0.self_attn.q_proj"
    pairs = write_adapter(
        tmp_path, {module: TARGETS[module]}, {"modules_to_save": ["lm_head", "embed_tokens"]}
    )
    gen = torch.Generator().manual_seed(4)
    head, embed = torch.randn(320, 64, generator=gen) * 0.2, torch.randn(320, 64, generator=gen)
    _add_tensors(
        tmp_path,
        {"base_model.model.lm_head.weight": head, "base_model.model.model.embed_tokens.weight": embed},
    )
    hf = _merged_hf(base_dir, pairs)
    with torch.no_grad():
        hf.lm_head.weight.copy_(head)
        hf.model.embed_tokens.weight.copy_(embed)
    _assert_generates_as(_load(base_dir, tmp_path), hf)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    "indices", [[3, 5, 17, 250], {"embed_tokens": [3, 5, 17, 250]}], ids=["list", "dict"]
)
def test_trainable_token_rows_replace_the_embeddings(tmp_path: Path, tied: bool, indices: Any) -> None:
    # trainable_token_indices: PEFT saves the new rows as <embedding>.token_adapter.trainable_tokens_delta
    # and writes them over the embedding's (and, tied, the head's: the same tensor).
    base = write_random_model(tmp_path / "base", "llama", {"tie_word_embeddings": tied}, seed=23)
    module = "model.layers.0.self_attn.q_proj"
    pairs = write_adapter(
        tmp_path / "adapter", {module: TARGETS[module]}, {"trainable_token_indices": indices}
    )
    new_rows = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    _add_tensors(tmp_path / "adapter", {key: new_rows})
    hf = _merged_hf(base, pairs)
    with torch.no_grad():
        hf.model.embed_tokens.weight[[3, 5, 17, 250]] = new_rows
    _assert_generates_as(_load(base, tmp_path / "adapter"), hf)


def test_trainable_token_rows_must_match_their_indices(base_dir: Path, tmp_path: Path) -> None:
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    write_adapter(tmp_path, config={"trainable_token_indices": [3, 5]})
    _add_tensors(tmp_path, {key: torch.zeros(3, 64)})
    with pytest.raises(ValueError, match=r"embed_tokens has \[3, 64\] trained rows for 2 token ids"):
        _load(base_dir, tmp_path)
    write_adapter(tmp_path, config={"trainable_token_indices": {"lm_head": [3, 5]}})
    _add_tensors(tmp_path, {key: torch.zeros(2, 64)})
    with pytest.raises(
        ValueError, match=r"trainable_token_indices gives no list of token ids for model\.embed_tokens"
    ):
        _load(base_dir, tmp_path)
    write_adapter(tmp_path, config={"trainable_token_indices": [3, 400]})
    _add_tensors(tmp_path, {key: torch.zeros(2, 64)})
    with pytest.raises(
        ValueError, match=r"embed_tokens.weight is \[320, 64\] but the adapter trains rows \[3, 400\]"
    ):
        _load(base_dir, tmp_path)


def test_trained_biases_replace_the_checkpoints(tmp_path: Path) -> None:
    # bias="all"/"lora_only": PEFT saves an adapted layer's bias as <module>.base_layer.bias and
    # (with "all") another layer's as <module>.bias.
    base = write_random_model(tmp_path / "base", "qwen2", seed=22)
    module = "model.layers.0.self_attn.q_proj"
    pairs = write_adapter(tmp_path / "adapter", {module: TARGETS[module]}, {"bias": "all"})
    gen = torch.Generator().manual_seed(5)
    q_bias, v_bias = torch.randn(64, generator=gen), torch.randn(32, generator=gen)
    _add_tensors(
        tmp_path / "adapter",
        {
            f"base_model.model.{module}.base_layer.bias": q_bias,
            "base_model.model.model.layers.1.self_attn.v_proj.bias": v_bias,
        },
    )
    hf = _merged_hf(base, pairs)
    with torch.no_grad():
        hf.get_submodule(module).bias.copy_(q_bias)
        hf.model.layers[1].self_attn.v_proj.bias.copy_(v_bias)
    _assert_generates_as(_load(base, tmp_path / "adapter"), hf)


def test_bias_for_a_layer_without_one_is_refused(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path, config={"bias": "all"})
    _add_tensors(
        tmp_path, {"base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias": torch.ones(64)}
    )
    with pytest.raises(
        ValueError, match=r"module\(s\) the model lacks: model.layers.0.self_attn.q_proj.bias"
    ):
        _load(base_dir, tmp_path)


@pytest.mark.parametrize(
    ("targets", "extra", "named"),
    [
        ({"lm_head": (320, 64)}, {}, "lm_head"),
        ({}, {"model.embed_tokens.lora_embedding_A": torch.zeros(RANK, 320),
              "model.embed_tokens.lora_embedding_B": torch.zeros(64, RANK)}, "embed_tokens"),
        ({}, {"model.embed_tokens.weight": torch.zeros(320, 64)}, "embed_tokens"),
    ],
    ids=["lm-head-lora", "embedding-lora", "saved-embedding"],
)  # fmt: skip
def test_adapting_tied_embeddings_is_refused(
    tmp_path: Path, targets: dict, extra: dict[str, torch.Tensor], named: str
) -> None:
    # One tensor serves both ends there; PEFT changes one of them only.
    base = write_random_model(tmp_path / "base", "llama", {"tie_word_embeddings": True})
    write_adapter(tmp_path / "adapter", {**targets, "model.layers.0.self_attn.q_proj": (64, 64)})
    _add_tensors(tmp_path / "adapter", {f"base_model.model.{k}": v for k, v in extra.items()})
    with pytest.raises(ValueError, match=f"adapting {named} of a model with tied embeddings"):
        _load(base, tmp_path / "adapter")


def test_adapter_directory_problems(base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing is not a directory"):
        _load(base_dir, tmp_path / "missing")
    with pytest.raises(ValueError, match=r"no adapter_config\.json \(expected a PEFT adapter directory"):
        _load(base_dir, tmp_path)
    with pytest.raises(ValueError, match=r"no adapter_config\.json: it holds config\.json, a full model\?"):
        _load(base_dir, base_dir)
    write_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no adapter_model\.safetensors \(or adapter_model\.bin\)"):
        _load(base_dir, tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"adapter_model\.bin cannot be read"):
        _load(base_dir, tmp_path)


def test_hub_id_adapter_is_named_as_not_downloaded(base_dir: Path) -> None:
    with pytest.raises(
        ValueError, match=r"'someone/my-lora' is not a local directory; adapters are not downloaded"
    ):
        load_model(base_dir, torch.float32, CPU, adapter_path="someone/my-lora", progress=False)


def test_adapter_path_expands_the_home_directory(
    base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_adapter(tmp_path / "lora")
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = _load(base_dir, tmp_path / "lora").model.model.layers[1].mlp.down_proj.weight
    loaded = load_model(base_dir, torch.float32, CPU, adapter_path="~/lora", progress=False)
    torch.testing.assert_close(loaded.model.model.layers[1].mlp.down_proj.weight, expected, rtol=0, atol=0)


def test_pickled_adapter_loads_as_its_safetensors(base_dir: Path, tmp_path: Path) -> None:
    # PEFT's save_pretrained(safe_serialization=False) writes adapter_model.bin.
    write_adapter(tmp_path / "safe")
    write_adapter(tmp_path / "pickled")
    tensors = load_file(str(tmp_path / "pickled" / "adapter_model.safetensors"))
    (tmp_path / "pickled" / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "pickled" / "adapter_model.bin")
    expected = _load(base_dir, tmp_path / "safe").model.model.layers[0].self_attn.qkv_proj.weight
    got = _load(base_dir, tmp_path / "pickled").model.model.layers[0].self_attn.qkv_proj.weight
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_adapter_initialised_on_rewritten_base_weights_warns(
    base_dir: Path, tmp_path: Path, init: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Unconverted, such an adapter is meant for the base model PEFT saved with it.
    write_adapter(tmp_path, config={"init_lora_weights": init})
    with caplog.at_level(logging.WARNING, logger="batchlm.models.lora"):
        _load(base_dir, tmp_path)
    assert f"init_lora_weights='{init}', which rewrites the base weights" in caplog.text
    assert "path_initial_model_for_weight_conversion" in caplog.text


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_plain_initialisations_do_not_warn(
    base_dir: Path, tmp_path: Path, init: Any, caplog: pytest.LogCaptureFixture
) -> None:
    write_adapter(tmp_path, config={"init_lora_weights": init})
    with caplog.at_level(logging.WARNING, logger="batchlm.models.lora"):
        _load(base_dir, tmp_path)
    assert "rewrites the base weights" not in caplog.text


def test_missing_lora_alpha_is_peft_default_not_r(base_dir: Path, tmp_path: Path) -> None:
    # PEFT's LoraConfig takes lora_alpha=8 whatever r is.
    module = "model.layers.1.mlp.down_proj"
    pairs = write_adapter(tmp_path, {module: TARGETS[module]})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    a, b = pairs[module]
    expected = _base_tensor(base_dir, module) + 8 / RANK * b @ a
    torch.testing.assert_close(_load(base_dir, tmp_path).model.model.layers[1].mlp.down_proj.weight, expected)


def test_module_without_its_b_matrix(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="v_proj lacks its lora_A or lora_B"):
        _load(base_dir, tmp_path)


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        ("{not json", r"adapter_config\.json is not valid JSON"),
        ("[4, 8]", r"adapter_config\.json must hold a JSON object"),
        (json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8}), r"q_proj has rank 4 but adapter_config\.json says r=8"),
        (json.dumps({"peft_type": "LORA", "r": 4, "rank_pattern": {"self_attn\\.q_proj": 2}}),
         r"q_proj has rank 4 but adapter_config\.json says rank_pattern\['self_attn\\\\.q_proj'\]=2"),
        (json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": "sixteen"}), r"lora_alpha must be a number, got 'sixteen'"),
        (json.dumps({"peft_type": "LORA", "r": 0}), r"r must be a positive integer, got 0"),
        (json.dumps({"peft_type": "LORA", "r": 4, "alpha_pattern": {"q_proj(": 2}}), r"alpha_pattern key 'q_proj\(' is not a regex"),
    ],
    ids=["invalid-json", "not-an-object", "rank-differs-from-r", "rank-differs-from-rank-pattern", "alpha-not-a-number",
         "zero-rank", "pattern-not-a-regex"],
)  # fmt: skip
def test_adapter_config_problems_are_named(
    base_dir: Path, tmp_path: Path, config_text: str, message: str
) -> None:
    write_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(config_text)
    with pytest.raises(ValueError, match=message):
        _load(base_dir, tmp_path)


def test_rank_pattern_ranks_are_accepted(base_dir: Path, tmp_path: Path) -> None:
    # PEFT's rank_pattern gives some modules another rank than r: the adapter is valid.
    patterns = {"q_proj": RANK, "v_proj": RANK, "mlp\\..*_proj": RANK}
    pairs = write_adapter(tmp_path, config={"r": 16, "lora_alpha": 8, "rank_pattern": patterns})
    loaded = _load(base_dir, tmp_path)
    module = "model.layers.1.mlp.down_proj"
    a, b = pairs[module]
    expected = _base_tensor(base_dir, module) + ALPHA / RANK * b @ a
    torch.testing.assert_close(loaded.model.model.layers[1].mlp.down_proj.weight, expected)


def test_alpha_pattern_scales_the_modules_it_names(base_dir: Path, tmp_path: Path) -> None:
    pairs = write_adapter(tmp_path, config={"alpha_pattern": {"self_attn.v_proj": 32}})
    loaded = _load(base_dir, tmp_path)
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj.weight
    for module, rows, alpha in (("q_proj", slice(0, 64), ALPHA), ("v_proj", slice(96, 128), 32)):
        name = f"model.layers.0.self_attn.{module}"
        a, b = pairs[name]
        torch.testing.assert_close(qkv[rows], _base_tensor(base_dir, name) + alpha / RANK * b @ a)


def test_lm_head_adapter_with_its_saved_base_layer(base_dir: Path, tmp_path: Path) -> None:
    # PEFT saves an adapted lm_head's base weight beside its lora_A/lora_B (save_embedding_layers).
    pairs = write_adapter(tmp_path, {"lm_head": (320, 64)})
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    base = _base_tensor(base_dir, "lm_head")
    tensors["base_model.model.lm_head.base_layer.weight"] = base
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    a, b = pairs["lm_head"]
    torch.testing.assert_close(_load(base_dir, tmp_path).model.lm_head.weight, base + ALPHA / RANK * b @ a)
    tensors["base_model.model.lm_head.base_layer.weight"] = torch.zeros(330, 64)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"copy of lm_head.weight is \[330, 64\].*resized vocabulary"):
        _load(base_dir, tmp_path)


def test_phi3_adapter_on_fused_projections_matches_transformers(tmp_path: Path) -> None:
    # Phi-3 checkpoints (and transformers' Phi-3) fuse q/k/v and gate/up: PEFT adapters target those names.
    base = write_random_model(tmp_path / "base", "phi3", {"pad_token_id": 0}, seed=21)
    targets = {
        "model.layers.0.self_attn.qkv_proj": (64 + 2 * 32, 64),
        "model.layers.1.mlp.gate_up_proj": (2 * 128, 64),
        "model.layers.1.self_attn.o_proj": (64, 64),
    }
    pairs = write_adapter(tmp_path / "adapter", targets)
    adapted = _load(base, tmp_path / "adapter")
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            hf.get_submodule(module).weight += ALPHA / RANK * b @ a
    prompt = [5, 17, 42, 99, 3, 250, 7]
    ours, our_logprobs = greedy_generate(adapted, prompt, 12)
    theirs, their_logprobs = hf_greedy(hf, prompt, 12)
    assert ours == theirs
    torch.testing.assert_close(our_logprobs, their_logprobs, atol=1e-4, rtol=0)
    _, base_logprobs = greedy_generate(_load(base), prompt, 12)
    assert not torch.allclose(base_logprobs, our_logprobs, atol=1e-2)  # the adapter took effect


def test_adapter_of_a_multimodal_gemma3_names_its_text_modules_as_transformers_does(tmp_path: Path) -> None:
    # PEFT names the text modules model.language_model.*; transformers writes the checkpoint with
    # language_model.model.* (as the published ones are).
    text = {**TINY_CONFIG, "num_hidden_layers": 2, "pad_token_id": 0, "tie_word_embeddings": True}
    hf = hf_gemma3_multimodal(text, seed=24)
    hf.save_pretrained(tmp_path / "base")
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in load_file(
        str(tmp_path / "base" / "model.safetensors")
    )
    targets = {
        "model.language_model.layers.0.self_attn.q_proj": (64, 64),
        "model.language_model.layers.1.mlp.down_proj": (64, 128),
    }
    pairs = write_adapter(tmp_path / "adapter", targets)
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            hf.get_submodule(module).weight += ALPHA / RANK * b @ a
    _assert_generates_as(_load(tmp_path / "base", tmp_path / "adapter"), hf)
    # An embedding is tied there too: refused under its nested name.
    write_adapter(tmp_path / "embedding", {"model.language_model.layers.0.self_attn.q_proj": (64, 64)})
    _add_tensors(
        tmp_path / "embedding",
        {"base_model.model.model.language_model.embed_tokens.weight": torch.zeros(320, 64)},
    )
    with pytest.raises(ValueError, match="adapting embed_tokens of a model with tied embeddings"):
        _load(tmp_path / "base", tmp_path / "embedding")
