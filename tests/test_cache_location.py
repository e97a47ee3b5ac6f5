"""Where the cache is: $BATCHLM_CACHE, else the XDG cache directory, else ~/.cache/batchlm; and its
files take the modes any file gets (0o666 less the umask), however they were written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchlm.config import cache_root, current_umask, make_shareable
from batchlm.models.cache_entry import build_entry


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("BATCHLM_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_without_settings_the_cache_is_under_the_home_directory(home: Path) -> None:
    assert cache_root() == home / ".cache" / "batchlm"


def test_xdg_cache_home_places_the_cache(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "batchlm"


def test_batchlm_cache_wins_over_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("BATCHLM_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


@pytest.mark.parametrize("value", ["", "relative/cache"])
def test_an_empty_or_relative_xdg_cache_home_is_ignored(
    home: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # The XDG convention: a relative path there is invalid and is to be ignored.
    monkeypatch.setenv("XDG_CACHE_HOME", value)
    assert cache_root() == home / ".cache" / "batchlm"


def test_the_cache_location_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    from batchlm.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "$BATCHLM_CACHE, else $XDG_CACHE_HOME/batchlm, else ~/.cache/batchlm" in " ".join(
        capsys.readouterr().out.split()
    )


def file_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_cache_entry_written_private_gets_the_usual_modes(tmp_path: Path) -> None:
    """safetensors writes its file 0o600 (and mkdtemp its directory 0o700): the demo model's weights
    were readable by their owner only, where the cache's other files were 0o644."""
    import numpy as np
    from safetensors.numpy import save_file

    def build(staging: Path) -> None:
        save_file({"w": np.zeros(2, np.float32)}, str(staging / "model.safetensors"))
        (staging / "sub").mkdir(mode=0o700)
        (staging / "sub" / "tool").write_text("#!/bin/sh\n")
        (staging / "sub" / "tool").chmod(0o700)
        (staging / "config.json").write_text("{}")

    entry = build_entry(tmp_path / "entry", ["model.safetensors", "config.json"], build, "test entry")
    umask = current_umask()
    assert file_mode(entry / "model.safetensors") == 0o666 & ~umask
    assert file_mode(entry / "config.json") == 0o666 & ~umask
    assert file_mode(entry) == file_mode(entry / "sub") == 0o777 & ~umask
    assert file_mode(entry / "sub" / "tool") == 0o777 & ~umask


def test_the_modes_follow_the_umask(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "f").chmod(0o600)
    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        make_shareable(tmp_path / "f")
    finally:
        os.umask(previous)
    assert file_mode(tmp_path / "f") == 0o640


def test_the_demo_model_files_are_readable_by_others(demo_model_dir: Path) -> None:
    umask = current_umask()
    for path in demo_model_dir.iterdir():
        assert file_mode(path) == 0o666 & ~umask, path.name


def test_a_cache_linked_to_a_directory_not_made_yet_is_made_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ~/.cache/batchlm linked to a bigger disk: the default model failed with "File exists" (mkdir of
    # the dangling link) and fell back to the demo model, which failed the same way.
    from batchlm.models.demo import DEMO_VERSION, ensure_demo_model

    link = tmp_path / "cache"
    link.symlink_to(tmp_path / "disk" / "batchlm")
    monkeypatch.setenv("BATCHLM_CACHE", str(link))
    assert cache_root() == tmp_path / "disk" / "batchlm"
    ensure_demo_model()
    assert (link / DEMO_VERSION / "config.json").is_file()
