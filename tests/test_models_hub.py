"""resolve_model_dir: local directories, hub repo ids, and the offline / unreachable errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import huggingface_hub
import pytest

from batchlm.models.hub import resolve_model_dir


def test_local_directory_is_returned_as_is(tmp_path: Path) -> None:
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_missing_local_paths_are_not_sent_to_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("a path must not reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_dir("./models/absent/model")
    with pytest.raises(ValueError, match=r"model file .* does not exist"):
        resolve_model_dir(str(tmp_path / "absent.Q4_K_M.gguf"))
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model_dir(str(tmp_path / "file.bin"))


def test_repo_id_is_downloaded_with_the_files_we_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def fake_download(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(tmp_path)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model_dir("Qwen/Qwen3-0.6B", revision="main") == tmp_path
    (call,) = calls
    assert call["repo_id"] == "Qwen/Qwen3-0.6B" and call["revision"] == "main"
    assert "*.safetensors" in call["allow_patterns"] and "config.json" not in call["ignore_patterns"]
    assert "consolidated*" in call["ignore_patterns"]
    assert call["local_files_only"] is False


def test_offline_and_not_cached_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError) as info:
        resolve_model_dir("batchlm-tests/not-a-cached-model")
    message = str(info.value)
    assert "'batchlm-tests/not-a-cached-model'" in message
    assert "HF_HUB_OFFLINE" in message and "local directory" in message


def test_unreachable_hub_names_the_model_and_suggests_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(repo_id: str, **kwargs: Any) -> str:
        raise OSError("connection refused")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ValueError, match=r"'org/model'.*hub could not be reached.*local directory"):
        resolve_model_dir("org/model")
