"""The built-in demo model: a small random-weight Llama with the offline tokenizer, built once and cached."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from batchlm.config import cache_root
from batchlm.models.cache_entry import build_entry, use_version
from batchlm.tokenizer.builder import (
    BOS_TOKEN,
    DEFAULT_VOCAB_SIZE,
    EOS_TOKEN,
    IM_END_TOKEN,
    build_tokenizer,
    special_token_ids,
)

logger = logging.getLogger(__name__)

# The served model name says what it is, so nobody mistakes its output for a real model's.
DEMO_MODEL_NAME = "batchlm-demo-random-weights"
# Bump when anything below changes: the cache directory name keeps old builds from being reused.
DEMO_VERSION = "demo-v1"
DEMO_SEED = 0

_IDS = special_token_ids()
DEMO_CONFIG: dict[str, Any] = {
    "vocab_size": DEFAULT_VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": _IDS[BOS_TOKEN],
    "eos_token_id": _IDS[EOS_TOKEN],
}
# Chat turns end with <|im_end|>, plain text with <|end_of_text|>: generation stops at either.
GENERATION_EOS_IDS = [_IDS[EOS_TOKEN], _IDS[IM_END_TOKEN]]
_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the demo model directory (`cache_dir` or cache_root(), then DEMO_VERSION), building
    it on first use. The build goes to a private temporary directory that is renamed into place, so
    processes starting together never see a half-written model. Older DEMO_VERSIONs that no running
    process uses are removed first."""
    cache = Path(cache_dir or cache_root()).expanduser()
    use_version(cache, DEMO_VERSION)
    target = build_entry(
        cache / DEMO_VERSION,
        _REQUIRED_FILES,
        lambda staging: write_model_dir(staging, "llama", DEMO_CONFIG, seed=DEMO_SEED),
        "cached demo model",
    )
    logger.warning(
        "model %r (%s) has RANDOM weights: it serves gibberish by design; pass --model for a real model",
        DEMO_MODEL_NAME,
        target,
    )
    return target


def write_model_dir(
    path: Path, model_type: str = "llama", overrides: dict[str, Any] | None = None, seed: int = 0
) -> Path:
    """Write a complete random-weight model directory: weights, the built-in tokenizer, and a
    generation_config.json whose eos_token_id lists <|end_of_text|> and <|im_end|>.

    The model's vocab_size defaults to the tokenizer's; a larger one (padded, as real checkpoints often
    are) is allowed, a smaller one is an error.
    """
    from batchlm.models.random_model import TINY_CONFIG, write_random_model

    params = {**TINY_CONFIG, "vocab_size": DEFAULT_VOCAB_SIZE, **(overrides or {})}
    if params["vocab_size"] < DEFAULT_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {params['vocab_size']} is smaller than the tokenizer's {DEFAULT_VOCAB_SIZE}"
        )
    params.update(bos_token_id=_IDS[BOS_TOKEN], eos_token_id=_IDS[EOS_TOKEN])
    out = write_random_model(path, model_type, overrides=params, seed=seed)
    build_tokenizer(out, vocab_size=DEFAULT_VOCAB_SIZE)
    generation_path = out / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.exists() else {}
    generation.update(bos_token_id=_IDS[BOS_TOKEN], eos_token_id=GENERATION_EOS_IDS)
    generation_path.write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    return out
