"""A GGUF file's derived directory is keyed by the file's contents, not its path: a copy or a moved
file (a moved cache, a model copied to another disk) reuses it and points it at itself, and a file
changed in place gets its own, even where its size and modification time are the old ones."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from batchlm.models import gguf_model_dir
from batchlm.models.gguf_model_dir import gguf_source, prepare_gguf_model_dir
from gguf_builder import write_tiny_gguf


def test_a_copy_reuses_the_derived_directory_and_loads_from_the_copy(tmp_path: Path) -> None:
    original = write_tiny_gguf(tmp_path / "a" / "tiny.gguf")
    first = prepare_gguf_model_dir(original, tmp_path / "cache")
    stamp = (first / "tokenizer.json").stat().st_mtime_ns
    copy = tmp_path / "b" / "tiny.gguf"
    copy.parent.mkdir()
    shutil.copyfile(original, copy)  # a new modification time
    original.unlink()
    assert prepare_gguf_model_dir(copy, tmp_path / "cache") == first
    assert (first / "tokenizer.json").stat().st_mtime_ns == stamp  # not derived again
    assert gguf_source(first) == copy.resolve()


def test_a_file_changed_in_place_is_derived_again(tmp_path: Path) -> None:
    """Same path, same size, same modification time, other metadata: the old entry is not reused."""
    path = write_tiny_gguf(tmp_path / "m" / "tiny.gguf", metadata={"general.sampling.temp": 0.5})
    first = prepare_gguf_model_dir(path, tmp_path / "cache")
    before = path.stat()
    write_tiny_gguf(path, metadata={"general.sampling.temp": 0.25})
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    second = prepare_gguf_model_dir(path, tmp_path / "cache")
    assert second != first
    assert json.loads((second / "generation_config.json").read_text())["temperature"] == 0.25


def test_the_key_reads_the_weights_too(tmp_path: Path) -> None:
    from batchlm.models.gguf_model_dir import file_key

    path = write_tiny_gguf(tmp_path / "m" / "tiny.gguf")
    key = file_key(path)
    with path.open("r+b") as file:  # the last bytes of the tensor data: the last sample
        file.seek(-8, os.SEEK_END)
        file.write(b"\x7f" * 8)
    assert file_key(path) != key


def test_a_read_only_cache_naming_a_copy_of_the_file_loads_that_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = write_tiny_gguf(tmp_path / "a" / "tiny.gguf")
    entry = prepare_gguf_model_dir(original, tmp_path / "cache")
    copy = tmp_path / "b" / "tiny.gguf"
    copy.parent.mkdir()
    shutil.copyfile(original, copy)

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(gguf_model_dir, "_write_json", read_only)
    # Linux refuses an unlink there before it looks whether the file exists.
    monkeypatch.setattr(Path, "unlink", read_only)
    assert prepare_gguf_model_dir(copy, tmp_path / "cache") == entry
    assert gguf_source(entry) == original.resolve()  # still there, the same contents
    os.unlink(original)
    with pytest.raises(OSError, match="Read-only"):
        prepare_gguf_model_dir(copy, tmp_path / "cache")
