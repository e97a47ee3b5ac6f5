"""A model's EOS ids beside its tokenizer's: the eos_token_id its generation_config.json (else its
config.json) states, an int or a list."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from batchlm.json_files import read_json_object


def unique_ids(ids: Sequence[int | None]) -> tuple[int, ...]:
    seen: dict[int, None] = {}
    for token_id in ids:
        if token_id is not None:
            seen[int(token_id)] = None
    return tuple(seen)


def model_config_files(directory: Path) -> list[Path]:
    """The files of a model directory that may state its EOS ids, in the order they are read."""
    return [directory / "generation_config.json", directory / "config.json"]


def configured_eos_ids(files: Sequence[Path]) -> list[int]:
    """eos_token_id of the first of `files` that sets it, as a list; [] when none does."""
    for file in files:
        if not file.is_file():
            continue
        value = read_json_object(file).get("eos_token_id")
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"eos_token_id in {file} must be an int or a list of ints, got {value!r}")
        return values
    return []
