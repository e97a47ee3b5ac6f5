"""A GGUF file's metadata values read as the model config needs them: a number of the right kind, or
a ValueError that names the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchlm.models.gguf_reader import GGUFFile


def required(reader: GGUFFile, key: str, path: Path, kind: type, default: Any = None) -> Any:
    """A metadata value of this Python kind (int or float: a number), or `default` when the file lacks
    it; ValueError naming the key when it is missing without a default or is not a number."""
    value = reader.metadata(key, default)
    if value is None:
        raise ValueError(f"{path}: the GGUF metadata lacks {key!r}, which batchlm needs to load the model")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{path}: GGUF metadata {key!r} is {value!r}, where a number was expected")
    return kind(value)


def required_int(reader: GGUFFile, key: str, path: Path, default: int | None = None) -> int:
    value = required(reader, key, path, float, default)
    if value != int(value) or value <= 0:
        raise ValueError(f"{path}: GGUF metadata {key!r} is {value!r}, where a positive integer was expected")
    return int(value)


def kv_head_count(reader: GGUFFile, arch: str, heads: int, path: Path) -> int:
    """The KV head count (all heads without the key, as llama.cpp reads it). Some converters write one
    a layer: the same for every layer reads as that number; differing counts are refused."""
    key = f"{arch}.attention.head_count_kv"
    value = reader.metadata(key)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(
                f"{path}: GGUF metadata {key!r} gives layers different KV head counts ({sorted(set(value))}), "
                "which batchlm does not load"
            )
        value = value[0]
    if value is None:
        return heads
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{path}: GGUF metadata {key!r} is {value!r}, where a positive integer was expected")
    return value
