"""Shared pytest fixtures: tiny random-weight model directories, their tokenizer, and an isolated cache.

Fixtures other test files may rely on (session-scoped, built once under pytest's temporary directory):

- ``tiny_model_dir(model_type="llama", tied=False, seed=0, **overrides) -> Path``: a factory returning a
  complete model directory (config.json + model.safetensors from
  ``batchlm.models.random_model.write_random_model``, the built-in byte-level BPE tokenizer with a
  ChatML chat template, and generation_config.json with ``eos_token_id=[1, 3]``). ``model_type`` is
  one of ``random_model.ARCHITECTURES`` ("llama", "qwen3", "gemma2", "mistral3"...); ``overrides`` are
  config fields on top of ``TINY_CONFIG`` (a multimodal type's go to its text model, whose type
  ``text_model_type`` may name: "ministral3" in a "mistral3")
  (vocab_size defaults to the tokenizer's 2048; a larger value gives a padded vocabulary). The same
  arguments return the same directory. Treat the directories as read-only.
- ``tiny_tokenizer``: ``batchlm.tokenizer.tokenizer.Tokenizer`` loaded from the tiny llama directory
  (bos 0 ``<|begin_of_text|>``, eos 1 ``<|end_of_text|>``, 2 ``<|im_start|>``, 3 ``<|im_end|>``).
- ``demo_model_dir``: the built-in demo model, built under the session's private cache.
- ``server`` and ``client`` (one a module): a live ``BackgroundServer`` on the module's own ``engine``
  fixture (a FakeEngine) with the module's ``server_settings`` (default ``ServerSettings()``), and the
  official openai client on it. A module overrides ``server`` to serve another engine (a real one that
  loads in the background: ``live_server.serving``), and ``client`` for another API key.
- ``browser`` (one a module) and ``page`` (a fresh context a test): Debian's headless Chromium through
  Playwright, for the chat page's tests. Without /usr/bin/chromium (or $BATCHLM_CHROMIUM) they skip,
  except under CI ($CI set, or $BATCHLM_REQUIRE_BROWSER, which .ci/run sets), where a missing browser
  is a failure. ``page`` fails its test on any uncaught page error or Content-Security-Policy breach.

Every session gets its own $BATCHLM_CACHE, so tests never read or write the user's ~/.cache/batchlm
(subprocesses started by tests inherit it).

A test, or the import of a test module, that changes the process's open-file limits fails (see
``leave_the_open_file_limits``): every later test, and every process it starts, would inherit them.
The logging setup a test changes (a CLI's main() run in-process configures logging) is put back after
it (``keep_the_logging_setup``). A server or engine (its threads, its core process) still running when
the module that started it has ended fails that module's last test (``nothing_outlives_its_module``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest
from _pytest.logging import LogCaptureHandler

from headless_chromium import CHROMIUM, CHROMIUM_ARGS

if TYPE_CHECKING:
    from batchlm.engine.client import EngineClient
    from batchlm.server.background import BackgroundServer
    from batchlm.server.state import ServerSettings
    from batchlm.tokenizer.tokenizer import Tokenizer

# No network (Hub downloads fail in CI anyway) and no tokenizers thread pool fighting pytest for 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TinyModelFactory = Callable[..., Path]

# Modules whose checks several test files share: their failures show the values compared, as a test's own
# do (pytest rewrites only the asserts of modules named before they are imported).
pytest.register_assert_rewrite(
    "expert_stacks_harness",
    "harmony_harness",
    "hopper_compile",
    "interpreter_harness",
    "lora_harness",
    "models_harness",
    "quant_checkpoints",
    "responses_harness",
    "stream_scan_harness",
    "tool_parser_cases",
)


# -- process-wide state a test leaves as it found it -----------------------------------------------


def _open_file_limits() -> tuple[int, int] | None:
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return None
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# The limits every test starts from (test_open_file_limit reads them; an unprivileged process can never
# raise its hard limit again once something lowered it, e.g. mlx_lm on import).
_open_files_baseline = [_open_file_limits()]


def _open_file_limits_changed() -> str | None:
    """What changed the open-file limits since the last check (put back where the system allows), or
    None."""
    before, now = _open_files_baseline[0], _open_file_limits()
    if now == before:
        return None
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
    _open_files_baseline[0] = _open_file_limits()  # so that only the culprit fails
    return f"the open-file limits (RLIMIT_NOFILE) changed from {before} to {now}"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    problem = _open_file_limits_changed()
    if problem is not None and report.outcome != "failed":
        report.outcome = "failed"
        where = collector.nodeid or "the session"
        hint = "mlx_lm does that on import: import batchlm.backends.mlx before it"
        report.longrepr = f"collecting {where}: {problem} ({hint})"
    return report


@pytest.fixture(autouse=True)
def leave_the_open_file_limits() -> Iterator[None]:
    yield
    problem = _open_file_limits_changed()
    if problem is not None:
        pytest.fail(f"{problem}: a test must put back what it changes")


# The loggers batchlm.logging_setup.configure_logging sets a level on, besides the root.
_CONFIGURED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def _logging_setup() -> tuple[list[int], list[logging.Handler]]:
    """The levels configure_logging sets, and the root's handlers but pytest's per-phase captures."""
    levels = [logging.getLogger(name).level for name in ("", *_CONFIGURED_LOGGERS)]
    root = logging.getLogger()
    return levels, [h for h in root.handlers if not isinstance(h, LogCaptureHandler)]


@pytest.fixture(autouse=True)
def keep_the_logging_setup() -> Iterator[None]:
    """configure_logging (run by the CLIs' main(), which tests call in-process) replaces the root's
    handlers, pytest's own included, with one on the stderr of that moment (a capture that is closed
    later: each later warning is then a "Logging error"), and sets levels: put back what the test found."""
    levels, handlers = _logging_setup()
    yield
    if _logging_setup() == (levels, handlers):
        return
    for name, level in zip(("", *_CONFIGURED_LOGGERS), levels, strict=True):
        logging.getLogger(name).setLevel(level)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if handler not in handlers and not isinstance(handler, LogCaptureHandler):
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)


# The threads of a BackgroundServer and of an engine's front end.
_SERVING_THREADS = ("batchlm-server-", "batchlm-engine-")
# A hang guard for the threads and processes a module's teardown has just told to stop.
_STOP_WAIT_S = 60.0


def _serving_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith(_SERVING_THREADS)}


@pytest.fixture(scope="module", autouse=True)
def nothing_outlives_its_module() -> Iterator[None]:
    """A server or engine left running holds its port, its threads and its core process for the rest of
    the session (and its temporary files past it): a module stops what it started."""
    threads, processes = _serving_threads(), set(multiprocessing.active_children())
    yield
    left = []
    for thread in _serving_threads() - threads:
        thread.join(_STOP_WAIT_S)
        if thread.is_alive():
            left.append(f"thread {thread.name}")
    for process in set(multiprocessing.active_children()) - processes:
        process.join(_STOP_WAIT_S)
        if process.is_alive():
            left.append(f"process {process.name} (pid {process.pid})")
    assert not left, f"still running after the module's tests: {', '.join(left)}"


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


# -- a live server on a module's engine -------------------------------------------------------------


@pytest.fixture(scope="module")
def server_settings() -> ServerSettings:
    """What `server` serves with; a module overrides this fixture for other settings."""
    from batchlm.server.state import ServerSettings

    return ServerSettings()


@pytest.fixture(scope="module")
def server(engine: EngineClient, server_settings: ServerSettings) -> Iterator[BackgroundServer]:
    """A live server, one a module, on the module's `engine` fixture: an engine ready at once (a
    FakeEngine). A module whose engine still has to load defines its own (tests/live_server.py)."""
    from batchlm.server.background import BackgroundServer

    with BackgroundServer(engine, server_settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Any:
    """The official openai client on the module's `server`."""
    from fake_engine import openai_client

    return openai_client(server.base_url)


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
