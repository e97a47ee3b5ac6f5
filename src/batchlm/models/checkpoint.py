"""Read an HF checkpoint directory: config.json (with overrides) and the safetensors weight files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from batchlm.json_files import read_json_object
from batchlm.models.registry import architecture_of, get_model_class

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def load_hf_config(model_dir: Path, overrides: dict[str, Any] | None = None) -> Any:
    """The transformers config of `model_dir`, after applying `overrides` to config.json's fields.

    Checks the architecture first, so an unsupported model fails with our message, not a
    transformers error about an unknown model_type.
    """
    from transformers import CONFIG_MAPPING

    path = model_dir / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{model_dir} has no config.json; a model directory needs config.json and *.safetensors"
        )
    raw = read_json_object(path)
    raw.update(overrides or {})
    get_model_class(architecture_of(raw))
    model_type = str(raw.get("model_type"))
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{path}: unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(raw)


def find_safetensors(model_dir: Path) -> list[Path]:
    """The weight files: those named by the shard index, else model.safetensors, else any *.safetensors."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f'{index} has no "weight_map" object mapping tensor names to shard files')
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{index} names shard file(s) that are missing: {', '.join(absent)}")
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    # consolidated*.safetensors hold Mistral's native format, not HF names.
    files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if files:
        return files
    if any(model_dir.glob("pytorch_model*.bin")) or any(model_dir.glob("*.pt")):
        raise ValueError(
            f"{model_dir} has only PyTorch .bin/.pt weights; batchlm loads safetensors only "
            "(convert them, e.g. with transformers' save_pretrained(..., safe_serialization=True))"
        )
    raise ValueError(f"{model_dir} has no *.safetensors weight files")


def iter_safetensors(files: list[Path], progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every file, on the CPU, one file open at a time."""
    from tqdm.auto import tqdm

    for path in tqdm(files, desc="Loading safetensors shards", unit="shard", disable=not progress):
        with open_safetensors(path) as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                yield name, handle.get_tensor(name)


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """safe_open on the CPU; a truncated or corrupted file is a ValueError naming it, not a Rust error."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}); it is truncated or corrupted, "
            "download or write it again"
        ) from None
    with handle:
        yield handle
