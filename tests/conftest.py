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
- ``browser`` (one a module) and ``page`` (a fresh context a test): Debian's headless Chromium through
  Playwright, for the chat page's tests. Without /usr/bin/chromium (or $BATCHLM_CHROMIUM) they skip,
  except under CI ($CI set, or $BATCHLM_REQUIRE_BROWSER, which .ci/run sets), where a missing browser
  is a failure. ``page`` fails its test on any uncaught page error or Content-Security-Policy breach.

Every session gets its own $BATCHLM_CACHE, so tests never read or write the user's ~/.cache/batchlm
(subprocesses started by tests inherit it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from headless_chromium import CHROMIUM, CHROMIUM_ARGS

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


# -- the chat page's browser ----------------------------------------------------------------------

# Playwright's timeout for each wait in the browser tests: far above any page's work, a hang guard.
BROWSER_WAIT_MS = 60_000


def _unavailable(reason: str) -> NoReturn:
    required = (os.environ.get(name, "").lower() for name in ("CI", "BATCHLM_REQUIRE_BROWSER"))
    if any(value not in ("", "0", "false") for value in required):
        pytest.fail(f"{reason} (CI must run the browser tests; .ci/run installs Debian's chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = shutil.which(CHROMIUM)
    if executable is None:
        _unavailable(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (it is in the dev extra)")
    with sync_playwright() as playwright:
        # Playwright gives each launch a new empty profile directory of its own.
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _note_policy_violation(text: str, errors: list[str]) -> None:
    """The page's own code must run under its Content-Security-Policy."""
    if "Content Security Policy" in text:
        errors.append(text)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (its own localStorage); fails the test on any uncaught page error."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    context.set_default_timeout(BROWSER_WAIT_MS)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on("console", lambda message: _note_policy_violation(message.text, errors))
    yield opened
    context.close()
    assert errors == []
