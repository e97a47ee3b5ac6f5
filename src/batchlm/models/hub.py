"""Turn a model argument (local directory or Hugging Face Hub repo id) into a local directory."""

from __future__ import annotations

import os
from pathlib import Path

# What a served model needs from a hub repo: config, safetensors weights, tokenizer files.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
# Mistral repos also ship the same weights in their own format; Llama repos an "original/" copy.
IGNORE_PATTERNS = ["consolidated*", "original/*"]


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, when it is imported.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _looks_like_path(model: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else with separators is meant as a path.
    # A name ending in .gguf means a local GGUF file, not a hub repository.
    return (
        model.startswith((".", "/", "~", "\\"))
        or model.count("/") > 1
        or "\\" in model
        or ":" in model
        or model.lower().endswith(".gguf")
    )


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local directory as is, or a hub repo id downloaded (config, weights, tokenizer) to the cache.

    Raises ValueError naming the model when the path is missing or the hub cannot provide it.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"model path {model!r} is a file; give the directory that holds config.json")
    if _looks_like_path(model):
        kind = "model file" if path.suffix.lower() == ".gguf" else "model directory"
        raise ValueError(f"{kind} {model!r} does not exist")
    return _download(model, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    offline = _hub_offline()
    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            local_files_only=offline,
        )
    except GatedRepoError as err:
        raise ValueError(
            f"model {repo_id!r} is gated on the Hugging Face Hub: log in (HF_TOKEN) after accepting its terms"
        ) from err
    except RevisionNotFoundError as err:
        raise ValueError(f"model {repo_id!r} has no revision {revision!r} on the Hugging Face Hub") from err
    except RepositoryNotFoundError as err:
        raise ValueError(
            f"model {repo_id!r} is not a local directory and no such repo exists on the Hugging Face Hub"
        ) from err
    except Exception as err:  # connection errors come in many types (httpx, OSError, hub errors)
        reason = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else "the hub could not be reached"
        )
        raise ValueError(
            f"could not get model {repo_id!r} from the Hugging Face Hub: {reason} ({type(err).__name__}: {err}). "
            "Pass a local directory holding config.json and *.safetensors instead."
        ) from err
    return Path(str(local))
