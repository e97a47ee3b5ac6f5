"""Directories that processes mark in use with a lock file and that another process removes once no
process holds it: the cache's old versions (models/cache_entry.py) and the temp directories of killed
processes (temp_dirs.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def remove_directory(directory: Path, why: str) -> None:
    """Delete `directory`, renamed aside first (beside it) so that no process sees it half deleted, and
    log the space freed at info level."""
    size = _size(directory)
    trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}-removing-", dir=directory.parent))
    try:
        directory.rename(trash / directory.name)
    except OSError as error:
        # Refused (another user's directory), or removed by another process first: the empty trash goes,
        # not to be found, removed and made again at every start.
        with contextlib.suppress(FileNotFoundError):
            trash.rmdir()
        if isinstance(error, FileNotFoundError) and not directory.exists():
            return
        raise  # the trash went instead (another process took it for a cut-short removal's): said
    shutil.rmtree(trash, ignore_errors=True)
    if trash.exists():
        raise OSError(f"could not delete all of {trash}")
    logger.info("removed %s (%s): %.1f MiB freed", directory, why, size / 2**20)


def _size(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def lock_file(path: Path, operation: int) -> int | None:
    """A descriptor of the lock file `path` (created if missing, readable by all so that another user
    sharing the cache can lock it too), locked by `operation`; None when LOCK_NB finds it held. A
    file removed while it was being locked is opened again."""
    import fcntl

    while True:
        handle = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(handle, operation)
        except BlockingIOError:
            os.close(handle)
            return None
        except BaseException:
            os.close(handle)
            raise
        try:
            if os.path.samestat(os.fstat(handle), os.stat(path)):
                return handle
        except FileNotFoundError:
            pass
        os.close(handle)
