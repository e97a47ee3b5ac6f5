"""LoRA adapters that cannot be merged as PEFT would merge them, refused with what is wrong named
(modules and shapes the model lacks, PEFT features and other methods' tensors, a broken adapter
directory or adapter_config.json), and the adapter settings that only warn (bookkeeping batchlm does
not know, initialisations that rewrote the base weights)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchlm.models.loader import load_model
from batchlm.models.random_model import write_random_model
from lora_harness import CPU, RANK, add_tensors, load, write_adapter


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("base"), "llama", seed=20)


def test_adapter_for_a_module_the_model_lacks(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path, {"model.layers.7.self_attn.q_proj": (64, 64)})
    with pytest.raises(ValueError, match=r"does not match the base model.*model.layers.7.self_attn.q_proj"):
        load(base_dir, tmp_path)


def test_adapter_with_mismatched_shapes(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path, {"model.layers.0.self_attn.q_proj": (64, 48)})
    with pytest.raises(
        ValueError, match=r"does not match the base model.*q_proj.weight is \[64, 64\].*\[64, 48\]"
    ):
        load(base_dir, tmp_path)


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
        load(base_dir, tmp_path)  # settings that leave the math alone are accepted
        return
    with pytest.raises(ValueError, match=message):
        load(base_dir, tmp_path)


def test_unknown_bookkeeping_settings_are_named_in_a_warning(
    base_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_adapter(tmp_path, config={"trainer_notes": "run 7", "unsloth_version": "2026.1"})
    with caplog.at_level(logging.WARNING, logger="batchlm.models.lora"):
        load(base_dir, tmp_path)
    assert "ignoring adapter_config.json settings unknown to batchlm: trainer_notes='run 7'" in caplog.text


def test_tensors_of_other_methods_are_refused(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path)
    add_tensors(tmp_path, {"base_model.model.model.layers.0.self_attn.q_proj.lora_diag": torch.ones(RANK)})
    with pytest.raises(ValueError, match=r"unsupported tensor '.*q_proj\.lora_diag'"):
        load(base_dir, tmp_path)


def test_tensors_without_peft_prefix_are_named(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path)
    add_tensors(tmp_path, {"model.layers.0.self_attn.k_proj.lora_A.weight": torch.ones(RANK, 64)})
    with pytest.raises(
        ValueError, match=r"'model.layers.0.self_attn.k_proj.lora_A.weight' is not named as PEFT"
    ):
        load(base_dir, tmp_path)


def test_adapter_directory_problems(base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing is not a directory"):
        load(base_dir, tmp_path / "missing")
    with pytest.raises(ValueError, match=r"no adapter_config\.json \(expected a PEFT adapter directory"):
        load(base_dir, tmp_path)
    with pytest.raises(ValueError, match=r"no adapter_config\.json: it holds config\.json, a full model\?"):
        load(base_dir, base_dir)
    write_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no adapter_model\.safetensors \(or adapter_model\.bin\)"):
        load(base_dir, tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"adapter_model\.bin cannot be read"):
        load(base_dir, tmp_path)


def test_hub_id_adapter_is_named_as_not_downloaded(base_dir: Path) -> None:
    with pytest.raises(
        ValueError, match=r"'someone/my-lora' is not a local directory; adapters are not downloaded"
    ):
        load_model(base_dir, torch.float32, CPU, adapter_path="someone/my-lora", progress=False)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_adapter_initialised_on_rewritten_base_weights_warns(
    base_dir: Path, tmp_path: Path, init: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Unconverted, such an adapter is meant for the base model PEFT saved with it.
    write_adapter(tmp_path, config={"init_lora_weights": init})
    with caplog.at_level(logging.WARNING, logger="batchlm.models.lora"):
        load(base_dir, tmp_path)
    assert f"init_lora_weights='{init}', which rewrites the base weights" in caplog.text
    assert "path_initial_model_for_weight_conversion" in caplog.text


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_plain_initialisations_do_not_warn(
    base_dir: Path, tmp_path: Path, init: Any, caplog: pytest.LogCaptureFixture
) -> None:
    write_adapter(tmp_path, config={"init_lora_weights": init})
    with caplog.at_level(logging.WARNING, logger="batchlm.models.lora"):
        load(base_dir, tmp_path)
    assert "rewrites the base weights" not in caplog.text


def test_module_without_its_b_matrix(base_dir: Path, tmp_path: Path) -> None:
    write_adapter(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="v_proj lacks its lora_A or lora_B"):
        load(base_dir, tmp_path)


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
        load(base_dir, tmp_path)
