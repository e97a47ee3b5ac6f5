"""The temp directories of a process (stored responses, shared metrics, private kernels) are locked
for as long as it lives, and a later start removes those that killed processes left."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from batchlm import temp_dirs
from batchlm.temp_dirs import (
    ABANDONED_AGE_S,
    LOCK_NAME,
    METRICS_PREFIX,
    RESPONSES_PREFIX,
    UNLOCKED_AGE_S,
    make_temp_dir,
    remove_abandoned,
    remove_temp_dir,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no flock")

# Makes a directory under $TMPDIR the way the server does, says its path, and lives until stdin closes.
_OWNER = """
import sys
from batchlm.temp_dirs import make_temp_dir
print(make_temp_dir(sys.argv[1]), flush=True)
sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def private_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(temp_dirs, "_SWEPT", set())


def _abandoned(parent: Path, name: str, *, lock_file: bool = True) -> Path:
    """A directory as a killed process leaves it: its lock file there, held by nobody."""
    directory = parent / name
    directory.mkdir()
    (directory / "responses.sqlite3").write_bytes(b"x" * 4096)
    if lock_file:
        (directory / LOCK_NAME).touch()
    return directory


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def test_a_directory_of_a_living_process_is_kept_and_goes_once_it_is_killed(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, RESPONSES_PREFIX],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert owner.stdout is not None
        directory = Path(owner.stdout.readline().strip())
        assert directory.parent == tmp_path and (directory / LOCK_NAME).is_file()
        # However old it looks: its process holds the lock.
        remove_abandoned(tmp_path, now=_mtime(directory) + 10 * UNLOCKED_AGE_S)
        assert directory.is_dir()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert directory.is_dir()  # a SIGKILL leaves it
    remove_abandoned(tmp_path, now=_mtime(directory) + 2 * ABANDONED_AGE_S)
    assert not directory.exists()


def test_an_abandoned_directory_is_removed_and_the_space_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    responses = _abandoned(tmp_path, RESPONSES_PREFIX + "abc")
    metrics = _abandoned(tmp_path, METRICS_PREFIX + "def")
    other = _abandoned(tmp_path, "someone-else-responses-ghi")
    with caplog.at_level(logging.INFO, logger="batchlm"):
        remove_abandoned(tmp_path, now=_mtime(responses) + 2 * ABANDONED_AGE_S)
    assert not responses.exists() and not metrics.exists()
    assert other.is_dir()  # not one of batchlm's prefixes
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name]  # no trash left beside
    removals = [r for r in caplog.records if "MiB freed" in r.getMessage()]
    assert len(removals) == 2 and all(r.levelno == logging.INFO for r in removals)


def test_an_unlocked_directory_just_made_is_kept(tmp_path: Path) -> None:
    """One whose process is between making it and locking it."""
    directory = _abandoned(tmp_path, RESPONSES_PREFIX + "abc")
    remove_abandoned(tmp_path, now=_mtime(directory) + ABANDONED_AGE_S / 2)
    assert directory.is_dir()


def test_a_directory_without_a_lock_file_goes_only_past_a_day(tmp_path: Path) -> None:
    """An older batchlm's (or one made this instant): whether its process lives cannot be known."""
    directory = _abandoned(tmp_path, RESPONSES_PREFIX + "abc", lock_file=False)
    remove_abandoned(tmp_path, now=_mtime(directory) + UNLOCKED_AGE_S / 2)
    assert directory.is_dir()
    remove_abandoned(tmp_path, now=_mtime(directory) + 2 * UNLOCKED_AGE_S)
    assert not directory.exists()


def test_what_a_cut_short_removal_left_is_removed(tmp_path: Path) -> None:
    trash = _abandoned(tmp_path, f".{RESPONSES_PREFIX}abc-removing-xyz", lock_file=False)
    remove_abandoned(tmp_path, now=_mtime(trash) + ABANDONED_AGE_S / 2)
    assert trash.is_dir()  # maybe another start deleting it this instant
    remove_abandoned(tmp_path, now=_mtime(trash) + 2 * ABANDONED_AGE_S)
    assert not trash.exists()


def test_a_removal_that_fails_is_logged_and_the_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    refused = _abandoned(tmp_path, RESPONSES_PREFIX + "a")
    removable = _abandoned(tmp_path, RESPONSES_PREFIX + "b")
    remove = temp_dirs.remove_directory

    def permission_denied(directory: Path, why: str) -> None:
        if directory == refused:
            raise PermissionError(13, "Permission denied", str(directory))
        remove(directory, why)

    monkeypatch.setattr(temp_dirs, "remove_directory", permission_denied)
    with caplog.at_level(logging.WARNING, logger="batchlm"):
        remove_abandoned(tmp_path, now=_mtime(refused) + 2 * ABANDONED_AGE_S)
    assert refused.is_dir() and not removable.exists()
    assert any(str(refused) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_another_users_directory_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _abandoned(tmp_path, RESPONSES_PREFIX + "abc")
    monkeypatch.setattr(os, "getuid", lambda: directory.stat().st_uid + 1)
    remove_abandoned(tmp_path, now=_mtime(directory) + 2 * UNLOCKED_AGE_S)
    assert directory.is_dir()


def test_a_made_directory_is_locked_until_removed_and_the_start_sweeps_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweeps: list[Path] = []
    monkeypatch.setattr(temp_dirs, "remove_abandoned", lambda parent: sweeps.append(parent))
    first = make_temp_dir(RESPONSES_PREFIX)
    second = make_temp_dir(METRICS_PREFIX)
    assert sweeps == [tmp_path]
    assert first.parent == tmp_path and first.name.startswith(RESPONSES_PREFIX)
    assert (first / LOCK_NAME).is_file() and first in temp_dirs._OWNED
    remove_temp_dir(first)
    remove_temp_dir(second)
    assert list(tmp_path.iterdir()) == []
    assert first not in temp_dirs._OWNED and second not in temp_dirs._OWNED


def test_the_servers_responses_directory_is_locked_while_it_serves_and_removed_after(tmp_path: Path) -> None:
    from batchlm.server.background import BackgroundServer
    from batchlm.server.state import ServerSettings
    from fake_engine import FakeEngine

    with BackgroundServer(FakeEngine(), ServerSettings()):
        (directory,) = tmp_path.glob(RESPONSES_PREFIX + "*")
        assert (directory / LOCK_NAME).is_file()
        remove_abandoned(tmp_path, now=_mtime(directory) + 10 * UNLOCKED_AGE_S)
        assert directory.is_dir()  # this process holds it
    assert not directory.exists()
