"""Directories of one process's own under the system temp dir (the stored responses' database, the
API servers' shared metrics, CPU kernels built for one process), and the removal of those a killed
process left.

A clean exit removes its directories; a SIGKILL, an OOM kill or a power loss does not, and a server
restarted after each crash would pile them up. So the process that makes one holds a lock on a file
inside it for as long as it lives (the system lets it go however the process ends), and every start
removes the directories of these prefixes whose lock nobody holds."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from batchlm.dir_locks import lock_file, remove_directory

logger = logging.getLogger(__name__)

RESPONSES_PREFIX = "batchlm-responses-"
METRICS_PREFIX = "batchlm-metrics-"
KERNELS_PREFIX = "batchlm-kernels-"
PREFIXES = (RESPONSES_PREFIX, METRICS_PREFIX, KERNELS_PREFIX)
# The file inside a directory whose lock its process holds.
LOCK_NAME = ".batchlm-owner.lock"
# Younger than this, an unlocked directory may be one whose process is between making it and
# locking it: kept.
ABANDONED_AGE_S = 60.0
# Directories of an older batchlm have no lock file: whether their process lives cannot be known, so
# only those untouched for this long go.
UNLOCKED_AGE_S = 86400.0

# Lock descriptors of this process's directories, by directory: held until the directory is removed.
_OWNED: dict[Path, int] = {}
_SWEPT: set[Path] = set()
_LOCK = threading.Lock()


def make_temp_dir(prefix: str) -> Path:
    """A new private directory under the system temp dir, marked as this process's until
    `remove_temp_dir` or exit; first (once a process) removing those that killed processes left."""
    remove_abandoned_once()
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        import fcntl
    except ImportError:  # Windows: no flock, nothing to mark it with
        return directory
    try:
        handle = lock_file(directory / LOCK_NAME, fcntl.LOCK_SH)
    except OSError as error:
        logger.debug(
            "cannot lock %s (%s); a later start will take it for an older batchlm's", directory, error
        )
        return directory
    assert handle is not None
    with _LOCK:
        _OWNED[directory] = handle
    return directory


def remove_temp_dir(directory: Path) -> None:
    """Delete a directory made by `make_temp_dir`, then let its lock go."""
    shutil.rmtree(directory, ignore_errors=True)
    with _LOCK:
        handle = _OWNED.pop(directory, None)
    if handle is not None:
        os.close(handle)


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    directory = make_temp_dir(prefix)
    try:
        yield directory
    finally:
        remove_temp_dir(directory)


def remove_abandoned_once() -> None:
    """`remove_abandoned` of the system temp dir, once a process (each removal is logged once)."""
    parent = Path(tempfile.gettempdir())
    with _LOCK:
        if parent in _SWEPT:
            return
        _SWEPT.add(parent)
    remove_abandoned(parent)


def remove_abandoned(parent: Path, now: float | None = None) -> None:
    """Remove this user's directories of PREFIXES in `parent` that no living process owns: those
    whose lock file nobody holds (untouched for ABANDONED_AGE_S at `now`), those with no lock file
    (an older batchlm's) untouched for UNLOCKED_AGE_S, and what a cut-short removal of one left. A
    removal that fails is logged, never raised: the start goes on."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock, so nothing can be known to be abandoned
        return
    now = time.time() if now is None else now
    try:
        names = sorted(os.listdir(parent))
    except OSError as error:
        logger.debug("cannot list %s (%s)", parent, error)
        return
    for name in names:
        if not name.lstrip(".").startswith(PREFIXES):
            continue
        path = parent / name
        try:
            status = path.lstat()
            # Another user's are theirs to remove (and a symlink is no directory of ours).
            if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid():
                continue
            age = now - status.st_mtime
            if name.startswith("."):
                if "-removing-" in name and age > ABANDONED_AGE_S:
                    remove_directory(path, "left by an interrupted removal")
            elif not (path / LOCK_NAME).exists():
                if age > UNLOCKED_AGE_S:
                    remove_directory(path, "left by an older batchlm, untouched for a day")
            elif age > ABANDONED_AGE_S:
                handle = lock_file(path / LOCK_NAME, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if handle is None:  # its process lives
                    continue
                try:
                    remove_directory(path, "left by a batchlm process that did not exit cleanly")
                finally:
                    os.close(handle)
        except FileNotFoundError:  # removed meanwhile, by its process or another start
            continue
        except OSError as error:
            logger.warning("could not remove %s, left by an earlier batchlm process: %s", path, error)
