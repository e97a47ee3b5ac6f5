"""Mistral 3 multimodal checkpoints (Mistral Small 3.1 / 3.2) against transformers: the text model
served from either tensor layout, vision weights skipped, the LM head as the checkpoint holds it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchlm.models.loader import load_model
from batchlm.models.mistral3 import Mistral3ForConditionalGeneration
from batchlm.models.random_model import write_random_model
from models_harness import (
    CPU,
    PROMPTS,
    assert_greedy_matches_hf,
    assert_mixed_batch_matches_requests_alone,
    hf_reference_model,
)

NEW_TOKENS = 16
# transformers 5 keeps the model as model.language_model.* / model.vision_tower.* / lm_head; it (and
# the published checkpoints) write language_model.model.* / vision_tower.* / language_model.lm_head.
_TRANSFORMERS_5_NAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def in_transformers_5_layout(model_dir: Path) -> None:
    """Rewrite the checkpoint's tensors under the names transformers 5 keeps them by."""
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    renamed = {}
    for name, tensor in tensors.items():
        prefix = next(old for old, _ in _TRANSFORMERS_5_NAMES if name.startswith(old))
        renamed[dict(_TRANSFORMERS_5_NAMES)[prefix] + name[len(prefix) :]] = tensor
    assert any(name.startswith("model.vision_tower.") for name in renamed)
    save_file(renamed, str(path), metadata={"format": "pt"})


def edit_config(model_dir: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def assert_matches_transformers(model_dir: Path) -> None:
    loaded = load_model(model_dir, torch.float32, CPU, progress=False)
    assert isinstance(loaded.model, Mistral3ForConditionalGeneration)
    hf = hf_reference_model(model_dir)
    assert_greedy_matches_hf(loaded, hf, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("layout", ["published", "transformers-5"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_text_model_matches_transformers(tmp_path: Path, layout: str, tied: bool) -> None:
    # A window shorter than the second prompt: the text config's, as Mistral applies it.
    model_dir = write_random_model(
        tmp_path, "mistral3", {"tie_word_embeddings": tied, "sliding_window": 6}, 31
    )
    if layout == "transformers-5":
        in_transformers_5_layout(model_dir)
    assert load_model(model_dir, torch.float32, CPU, progress=False).config.tie_word_embeddings is tied
    assert_matches_transformers(model_dir)


def test_a_config_silent_on_tying_keeps_the_checkpoints_own_head(tmp_path: Path) -> None:
    # The published configs state no tie_word_embeddings, which transformers 5's Mistral3Config reads
    # as True; the checkpoint's own LM head is the one transformers (and so batchlm) computes with.
    model_dir = write_random_model(tmp_path, "mistral3", {"tie_word_embeddings": False}, 32)

    def unstated(config: dict[str, Any]) -> None:
        del config["tie_word_embeddings"], config["text_config"]["tie_word_embeddings"]

    edit_config(model_dir, unstated)
    assert hf_reference_model(model_dir).config.tie_word_embeddings is True
    assert_matches_transformers(model_dir)


def test_mixed_batch_matches_requests_run_alone(tmp_path: Path) -> None:
    model_dir = write_random_model(tmp_path, "mistral3", {"sliding_window": 6}, 33)
    assert_mixed_batch_matches_requests_alone(load_model(model_dir, torch.float32, CPU, progress=False))


def test_another_text_model_is_refused_by_name(tmp_path: Path) -> None:
    # Mistral 4's text model (experts, latent attention) is neither Mistral's nor Ministral 3's
    # (tests/test_models_ministral3.py).
    model_dir = write_random_model(tmp_path, "mistral3", seed=34)
    edit_config(model_dir, lambda config: config["text_config"].update(model_type="mistral4"))
    with pytest.raises(ValueError, match="unsupported Mistral 3 text model 'mistral4'"):
        load_model(model_dir, torch.float32, CPU, progress=False)
