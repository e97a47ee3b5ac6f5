"""Shared pytest fixtures: tiny random-weight model directories, their tokenizer, and an isolated cache.

Fixtures other test files may rely on (session-scoped, built once under pytest's temporary directory):

- ``tiny_model_dir(model_type="llama", tied=False, seed=0, **overrides) -> Path``: a factory returning a
  complete model directory (config.json + model.safetensors from
  ``batchlm.models.random_model.write_random_model``, the built-in byte-level BPE tokenizer with a
  ChatML chat template, and generation_config.json with ``eos_token_id=[1, 3]``). ``model_type`` is
  "llama", "mistral", "qwen2" or "qwen3"; ``overrides`` are config fields on top of ``TINY_CONFIG``
  (vocab_size defaults to the tokenizer's 2048; a larger value gives a padded vocabulary). The same
  arguments return the same directory. Treat the directories as read-only.
- ``tiny_tokenizer``: ``batchlm.tokenizer.tokenizer.Tokenizer`` loaded from the tiny llama directory
  (bos 0 ``<|begin_of_text|>``, eos 1 ``<|end_of_text|>``, 2 ``<|im_start|>``, 3 ``<|im_end|>``).
- ``demo_model_dir``: the built-in demo model, built under the session's private cache.

Every session gets its own $BATCHLM_CACHE, so tests never read or write the user's ~/.cache/batchlm
(subprocesses started by tests inherit it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from batchlm.tokenizer.tokenizer import Tokenizer

# No network (Hub downloads fail in CI anyway) and no tokenizers thread pool fighting pytest for 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TinyModelFactory = Callable[..., Path]


@pytest.fixture(scope="session", autouse=True)
def isolated_batchlm_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point $BATCHLM_CACHE at a per-session directory for the whole run."""
    cache = tmp_path_factory.mktemp("batchlm-cache")
    previous = os.environ.get("BATCHLM_CACHE")
    os.environ["BATCHLM_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("BATCHLM_CACHE", None)
    else:
        os.environ["BATCHLM_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    """Factory: tiny_model_dir(model_type="llama", tied=False, seed=0, **overrides) -> model directory."""
    from batchlm.models.demo import write_model_dir

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def make(model_type: str = "llama", tied: bool = False, seed: int = 0, **overrides: Any) -> Path:
        params = {**overrides, "tie_word_embeddings": tied}
        key = json.dumps([model_type, seed, params], sort_keys=True)
        if key not in built:
            directory = root / f"{model_type}{'-tied' if tied else ''}-{len(built)}"
            built[key] = write_model_dir(directory, model_type, overrides=params, seed=seed)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: TinyModelFactory) -> Tokenizer:
    """The Tokenizer of the tiny llama model directory."""
    from batchlm.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(tiny_model_dir("llama"))


@pytest.fixture(scope="session")
def demo_model_dir(isolated_batchlm_cache: Path) -> Path:
    """The built-in demo model directory (built on first use in this session's cache)."""
    from batchlm.models.demo import ensure_demo_model

    return ensure_demo_model(isolated_batchlm_cache)
