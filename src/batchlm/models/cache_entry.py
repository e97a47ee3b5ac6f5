"""A directory of the cache built once and shared by every process: built in a private staging
directory that is renamed into place, so that a racing or interrupted build never leaves a half
directory under the real name, and an entry found incomplete (a file deleted from it) is replaced.

Entries live in versioned directories (gguf-v4, demo-v1) whose number goes up when what is built
changes. Each process holds a shared lock on its version's lock file for as long as it lives (the
system lets it go however the process ends), so that a newer version can remove the older versions'
directories once no process uses them, and the staging directories of killed builds once no other
process uses its own."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from batchlm.config import make_shareable
from batchlm.dir_locks import lock_file, remove_directory

logger = logging.getLogger(__name__)

# A versioned directory of the cache: its family (gguf, demo) and number.
_VERSIONED = re.compile(r"(?P<family>[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*)-v(?P<number>\d+)")
# What an interrupted build or removal leaves: build_entry's staging and discarded directories, and
# the directory an older version is renamed to before it is deleted.
_LEFTOVER = re.compile(r"\..+-(building|discarded|removing)-[^/]+")
# Age past which a staging directory is no build's under way (a build takes seconds to minutes): the
# lock tells of the processes that take it, the age of those of an older batchlm that did not.
LEFTOVER_AGE_S = 3600.0
# The lock files this process holds shared (their descriptors), by path: held until it exits.
_HELD: dict[Path, int] = {}
_HELD_LOCK = threading.Lock()


def is_complete(directory: Path, files: Sequence[str]) -> bool:
    return all((directory / name).is_file() for name in files)


def build_entry(target: Path, files: Sequence[str], build: Callable[[Path], object], what: str) -> Path:
    """`target`, holding `files`: built by `build(staging)` first unless it holds them already. A
    concurrent build that wins the rename is taken as it is (the builds are deterministic)."""
    if is_complete(target, files):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-building-", dir=target.parent))
    try:
        build(staging)
        make_shareable(staging)  # mkdtemp (and safetensors' writer) make it private
        _discard_incomplete(target, files, what)
        try:
            staging.rename(target)
        except OSError:
            if not is_complete(target, files):  # not a concurrent build that won the rename
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _discard_incomplete(target: Path, files: Sequence[str], what: str) -> None:
    """Move a damaged entry out of the way so that the new build can take its name: renamed first,
    so that a racing process never sees it half deleted."""
    if not target.exists() or is_complete(target, files):
        return
    logger.warning("the %s at %s is incomplete; replacing it", what, target)
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}-discarded-", dir=target.parent))
    with contextlib.suppress(FileNotFoundError):  # another process moved it first
        target.rename(trash / target.name)
    shutil.rmtree(trash, ignore_errors=True)


def use_version(cache: Path, version: str, now: float | None = None) -> None:
    """Mark `cache/version` (a directory named like gguf-v4) in use by this process until it exits,
    first removing what no process can be using: when no other process uses this version, the
    staging directories that killed builds left (older than LEFTOVER_AGE_S at `now`); and the
    directories of the same family's older versions that no process uses (a newer one is never
    touched: an older batchlm may run beside). Each removal is logged with the space it freed. Once a
    process for each cache and version; a cache that cannot be written or locked (a read-only image,
    no fcntl) is left as it is."""
    match = _VERSIONED.fullmatch(version)
    if match is None:
        raise ValueError(f"not a versioned cache directory name: {version!r}")
    try:
        import fcntl
    except ImportError:  # Windows: no flock, so nothing can be known to be unused
        return
    lock_path = cache / f".{version}.lock"
    with _HELD_LOCK:
        if lock_path in _HELD:
            return
        try:
            cache.mkdir(parents=True, exist_ok=True)
            handle = lock_file(lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if handle is not None:  # no other process uses this version
                with _logged_failure(cache / version):
                    for leftover in _leftovers(cache, version, time.time() if now is None else now):
                        remove_directory(leftover, "left by an interrupted build")
                fcntl.flock(handle, fcntl.LOCK_SH)
            else:
                handle = lock_file(lock_path, fcntl.LOCK_SH)
        except OSError as error:
            logger.debug("cannot mark %s in use (%s); not removing older versions", cache / version, error)
            return
        assert handle is not None
        _HELD[lock_path] = handle
    for older in _older_versions(cache, match.group("family"), int(match.group("number"))):
        with _logged_failure(older):
            _remove_unused(older)


def _older_versions(cache: Path, family: str, number: int) -> list[Path]:
    """The family's older version directories, and what cut-short removals of them left."""
    older = []
    with contextlib.suppress(OSError):
        for path in cache.iterdir():
            match = _VERSIONED.fullmatch(path.name.lstrip(".").split("-removing-")[0])
            if match is None or match.group("family") != family or int(match.group("number")) >= number:
                continue
            if path.is_dir() and not path.is_symlink():
                older.append(path)
    return sorted(older)


def _leftovers(cache: Path, version: str, now: float) -> list[Path]:
    """The staging directories interrupted builds of `version` left: beside it (an entry that is the
    version directory itself, as the demo model's) and in it (its entries'); untouched for
    LEFTOVER_AGE_S."""
    beside = [p for p in cache.glob(f".{version}-*") if _LEFTOVER.fullmatch(p.name)]
    inside = [p for p in (cache / version).glob(".*") if _LEFTOVER.fullmatch(p.name)]
    return [
        path
        for path in beside + inside
        if path.is_dir() and not path.is_symlink() and now - path.stat().st_mtime > LEFTOVER_AGE_S
    ]


def _remove_unused(directory: Path) -> None:
    """Remove an older version's directory unless a process holds its lock: renamed aside first (no
    process of that version starting meanwhile sees it half deleted), then deleted."""
    import fcntl

    if directory.name.startswith("."):  # what a cut-short removal left: no process uses it
        remove_directory(directory, "left by an interrupted removal")
        return
    lock_path = directory.parent / f".{directory.name}.lock"
    handle = lock_file(lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if handle is None:
        logger.info("keeping %s, an older cache format: a running process uses it", directory)
        return
    try:
        remove_directory(directory, "an older cache format no longer used")
        # Under the lock: a process that opened the file meanwhile finds it gone and opens a new one.
        lock_path.unlink(missing_ok=True)
    finally:
        os.close(handle)


@contextlib.contextmanager
def _logged_failure(path: Path) -> Iterator[None]:
    """A removal that fails (a directory of another user's, a read-only cache) is logged, and the
    start goes on: the cache only holds what it did."""
    try:
        yield
    except OSError as error:
        logger.warning("could not remove %s from the cache: %s", path, error)
