"""batchlm's GGUF reader (models/gguf_reader.py) against the `gguf` package's, on files of every
tensor type we load, and its errors on files that are not GGUF."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from batchlm.models.gguf_reader import GGUFFile
from gguf_builder import assert_reads_like_the_gguf_package, write_tiny_gguf


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_1", "Q4_K", "Q6_K"])
def test_metadata_and_tensors_match_the_gguf_package(tmp_path: Path, qtype: str) -> None:
    assert_reads_like_the_gguf_package(write_tiny_gguf(tmp_path / "tiny.gguf", "llama", qtype))


def test_qwen_files_and_tied_embeddings_match_too(tmp_path: Path) -> None:
    assert_reads_like_the_gguf_package(write_tiny_gguf(tmp_path / "q.gguf", "qwen2", "Q8_0", tied=True))


def test_a_missing_value_gives_the_default_and_arrays_are_lists(tmp_path: Path) -> None:
    gguf = GGUFFile(write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert gguf.metadata("no.such.key") is None
    assert gguf.metadata("no.such.key", 7) == 7
    tokens = gguf.metadata("tokenizer.ggml.tokens")
    assert isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)
    assert gguf.metadata("general.architecture") == "llama"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"not a gguf file at all", "no GGUF magic"),
        (b"GGUF" + struct.pack("<I", 1) + bytes(16), "GGUF version 1"),
        (b"GGUF" + struct.pack(">I", 3) + bytes(16), "big-endian"),
    ],
)
def test_files_that_are_not_gguf_are_refused_by_name(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as caught:
        GGUFFile(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("keep", [30, 200, 0.5, 0.999])
def test_a_truncated_file_is_refused_by_name(tmp_path: Path, keep: float) -> None:
    whole = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(whole[: int(keep * len(whole)) if keep < 1 else int(keep)])
    with pytest.raises(ValueError, match=r"truncated\.gguf"):
        GGUFFile(path)


def gguf_bytes(fields: list[bytes], tensors: list[bytes]) -> bytes:
    """A GGUF v3 file of these encoded metadata entries and tensor-table entries, no data."""
    return b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(fields)) + b"".join(fields) + b"".join(tensors)


def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def test_a_zero_alignment_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "aligned.gguf"
    path.write_bytes(gguf_bytes([gguf_string("general.alignment") + struct.pack("<II", 4, 0)], []))
    with pytest.raises(ValueError, match=r"general\.alignment is 0"):
        GGUFFile(path)


def test_rows_that_are_not_whole_blocks_are_refused(tmp_path: Path) -> None:
    q8_0 = 8  # GGML type code: blocks of 32 values
    entry = gguf_string("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 33, 4)
    path = tmp_path / "blocks.gguf"
    path.write_bytes(gguf_bytes([], [entry + struct.pack("<IQ", q8_0, 0)]))
    with pytest.raises(
        ValueError, match=r"'token_embd\.weight' has rows of 33 values, not whole Q8_0 blocks"
    ):
        GGUFFile(path)


def test_a_file_of_metadata_alone_reads(tmp_path: Path) -> None:
    path = tmp_path / "metadata.gguf"
    path.write_bytes(gguf_bytes([gguf_string("general.name") + struct.pack("<I", 8) + gguf_string("x")], []))
    gguf = GGUFFile(path)
    assert (gguf.metadata("general.name"), gguf.tensors) == ("x", [])
