"""A directory of the cache built once and shared by every process: built in a private staging
directory that is renamed into place, so that a racing or interrupted build never leaves a half
directory under the real name, and an entry found incomplete (a file deleted from it) is replaced."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from batchlm.config import make_shareable

logger = logging.getLogger(__name__)


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
