"""The cache's versioned directories (gguf-v3, demo-v1): a newer version removes the older ones once
no running process uses them, and the staging directories of killed builds once no other process uses
its own; a process's use is a shared lock held until it exits, however it ends."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from batchlm.models import cache_entry
from batchlm.models.cache_entry import use_version
from batchlm.models.gguf_model_dir import DERIVED_VERSION, prepare_gguf_model_dir
from gguf_builder import write_tiny_gguf

MIB = 2**20


def _entry(path: Path, size: int = MIB) -> Path:
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_bytes(b"x" * size)
    return path


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


StartHolder = Callable[[Path, str], "subprocess.Popen[str]"]


@pytest.fixture
def other_process() -> Iterator[StartHolder]:
    """Starts processes that mark a version of a cache in use and hold it until their stdin closes."""
    started: list[subprocess.Popen[str]] = []

    def start(cache: Path, version: str) -> subprocess.Popen[str]:
        code = (
            "import sys; from pathlib import Path; from batchlm.models.cache_entry import use_version; "
            f"use_version(Path({str(cache)!r}), {version!r}); print('ready', flush=True); sys.stdin.read()"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        started.append(process)
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        return process

    yield start
    for process in started:
        if process.returncode is None:
            process.communicate("")


def _as_if_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget this process's marks, as a new process would start without them."""
    monkeypatch.setattr(cache_entry, "_HELD", {})


def test_older_versions_are_removed_and_the_space_freed_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    older = [_entry(cache / "gguf-v1" / "m-0"), _entry(cache / "gguf-v2" / "m-1", 2 * MIB)]
    newer = _entry(cache / "gguf-v4" / "m-2")  # an older batchlm beside may still be using it
    others = [_entry(cache / "demo-v0"), _entry(cache / "default-model"), _entry(cache / "kernels")]
    with caplog.at_level(logging.INFO, logger="batchlm"):
        use_version(cache, "gguf-v3")
    assert not any(path.parent.exists() for path in older)
    assert newer.exists() and all(path.exists() for path in others)
    assert not (cache / ".gguf-v2.lock").exists()
    assert sorted(p.name for p in cache.iterdir()) == [
        ".gguf-v3.lock",
        "default-model",
        "demo-v0",
        "gguf-v4",
        "kernels",
    ]
    freed = [r.getMessage() for r in caplog.records if "freed" in r.getMessage()]
    assert any(str(cache / "gguf-v2") in line and "2.0 MiB freed" in line for line in freed), freed


def test_an_older_version_a_running_process_uses_is_kept_until_it_exits(
    tmp_path: Path,
    other_process: StartHolder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = tmp_path / "cache"
    used = _entry(cache / "gguf-v2" / "m-0")
    holder = other_process(cache, "gguf-v2")
    with caplog.at_level(logging.INFO, logger="batchlm"):
        use_version(cache, "gguf-v3")
    assert used.exists()
    assert any("a running process uses it" in r.getMessage() for r in caplog.records)
    holder.communicate("")  # it exits: the system lets its lock go
    _as_if_started_again(monkeypatch)
    use_version(cache, "gguf-v3")
    assert not used.parent.exists()


def test_staging_left_by_killed_builds_goes_only_when_no_other_process_uses_the_version(
    tmp_path: Path, other_process: StartHolder
) -> None:
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    other_process(shared, "gguf-v3")  # started first: its build may be the one under way
    for cache in (shared, alone):
        _entry(cache / "gguf-v3" / ".m-0-building-abc")  # a build under way, or killed
        _entry(cache / ".demo-v1-building-def")  # the demo model's staging goes beside its directory
        _entry(cache / "gguf-v3" / "m-0")
    later = _mtime(shared / ".demo-v1-building-def") + cache_entry.LEFTOVER_AGE_S + 1
    use_version(shared, "gguf-v3", now=later)
    use_version(shared, "demo-v1", now=later)  # nobody else uses demo-v1 there: its staging goes
    assert (shared / "gguf-v3" / ".m-0-building-abc").exists()
    assert not (shared / ".demo-v1-building-def").exists()
    use_version(alone, "gguf-v3", now=later)
    assert not (alone / "gguf-v3" / ".m-0-building-abc").exists()
    assert (alone / "gguf-v3" / "m-0").exists() and (alone / ".demo-v1-building-def").exists()


def test_staging_being_written_stays_even_alone(tmp_path: Path) -> None:
    """An older batchlm takes no lock: a staging directory written to lately may be its build's."""
    cache = tmp_path / "cache"
    staging = _entry(cache / "gguf-v3" / ".m-0-building-abc")
    use_version(cache, "gguf-v3", now=_mtime(staging) + cache_entry.LEFTOVER_AGE_S / 2)
    assert staging.exists()


def test_what_a_cut_short_removal_left_is_removed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    trash = _entry(cache / ".gguf-v2-removing-abc" / "gguf-v2")
    use_version(cache, "gguf-v3")
    assert not trash.parent.exists()


def test_a_cache_that_cannot_be_locked_is_left_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(path: Path, operation: int) -> int:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(cache_entry, "lock_file", read_only)
    older = _entry(tmp_path / "cache" / "gguf-v2" / "m-0")
    use_version(tmp_path / "cache", "gguf-v3")
    assert older.exists()


def test_deriving_a_gguf_file_removes_older_formats(tmp_path: Path) -> None:
    """The upgrade case: the cache of a format batchlm no longer reads goes at the next start."""
    number = int(DERIVED_VERSION.rsplit("-v", 1)[1])
    older = _entry(tmp_path / "cache" / f"gguf-v{number - 1}" / "tiny-0123456789abcdef")
    entry = prepare_gguf_model_dir(write_tiny_gguf(tmp_path / "m" / "tiny.gguf"), tmp_path / "cache")
    assert entry.is_dir() and not older.parent.exists()


def test_a_removal_the_system_refuses_leaves_no_empty_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An older version that cannot be moved (another user's, in a sticky cache) is kept, and so is
    nothing else: not one more empty folder beside it at each start."""
    cache = tmp_path / "cache"
    older = _entry(cache / "gguf-v2" / "m-0")
    rename = Path.rename

    def refuse_older(self: Path, target: Path) -> Path:
        if self == older.parent:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse_older)
    with caplog.at_level(logging.WARNING, logger="batchlm"):
        use_version(cache, "gguf-v3")
    assert older.exists()
    assert sorted(p.name for p in cache.iterdir()) == [".gguf-v2.lock", ".gguf-v3.lock", "gguf-v2"]
    assert any("could not remove" in r.getMessage() for r in caplog.records)


def test_a_removal_whose_trash_another_process_took_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process starting meanwhile may remove the folder a removal just made to move the version
    into (it looks like what a cut-short removal left): the version stays, and the log says so."""
    cache = tmp_path / "cache"
    older = _entry(cache / "gguf-v2" / "m-0")
    rename = Path.rename

    def trash_taken(self: Path, target: Path) -> Path:
        if self == older.parent:
            target.parent.rmdir()  # the other process's removal of the empty trash
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", trash_taken)
    with caplog.at_level(logging.WARNING, logger="batchlm"):
        use_version(cache, "gguf-v3")
    assert older.exists()
    assert any("could not remove" in r.getMessage() for r in caplog.records)
    assert not [p for p in cache.iterdir() if "-removing-" in p.name]
