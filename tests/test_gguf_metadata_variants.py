"""GGUF files as converters of different versions write them (models/gguf_file.py, gguf_model_dir.py,
hub.py): optional keys absent, per-layer KV head counts, split shards, end-of-turn tokens, tokenizer
metadata that contradicts the weights. Tiny metadata-only files: each case is refused naming what is
wrong, or read as llama.cpp reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFValueType, GGUFWriter

from batchlm.models.gguf_file import hf_config
from batchlm.models.gguf_model_dir import end_of_generation_ids, find_gguf_file, prepare_gguf_model_dir
from batchlm.models.gguf_reader import GGUFFile
from batchlm.models.hub import resolve_model_dir
from batchlm.tokenizer.tokenizer import Tokenizer
from gguf_builder import write_tiny_gguf

TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "ab"]
LLAMA_KEYS: dict[str, Any] = {
    "llama.block_count": 1,
    "llama.context_length": 64,
    "llama.embedding_length": 8,
    "llama.feed_forward_length": 16,
    "llama.attention.head_count": 2,
    "llama.attention.head_count_kv": 1,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "llama.rope.freq_base": 10000.0,
}


def _write(
    path: Path,
    drop: tuple[str, ...] = (),
    extra: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] | None = None,
    tokens: list[str] = TOKENS,
    embedding_rows: int = len(TOKENS),
    embedding: bool = True,
) -> Path:
    writer = GGUFWriter(str(path), "llama")
    for key, value in LLAMA_KEYS.items():
        if key not in drop:
            kind = GGUFValueType.FLOAT32 if isinstance(value, float) else GGUFValueType.UINT32
            writer.add_key_value(key, value, kind)
    if "tokenizer" not in drop:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        if "merges" not in drop:
            writer.add_token_merges(["a b"])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
    for key, (value, kind, sub_type) in (extra or {}).items():
        writer.add_key_value(key, value, kind, sub_type=sub_type)
    if embedding:
        writer.add_tensor("token_embd.weight", np.zeros((embedding_rows, 8), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "key",
    [
        "llama.context_length",
        "llama.attention.layer_norm_rms_epsilon",  # was read as NaN: every output token 0
        "llama.feed_forward_length",
        "llama.block_count",
        "llama.attention.head_count",
    ],
)
def test_a_missing_required_key_is_named(tmp_path: Path, key: str) -> None:
    path = _write(tmp_path / "m.gguf", drop=(key,))
    with pytest.raises(ValueError, match=f"lacks '{key}'"):
        hf_config(GGUFFile(path), path)


def test_optional_keys_take_llama_cpps_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.gguf", drop=("llama.attention.head_count_kv", "llama.rope.freq_base"))
    config = hf_config(GGUFFile(path), path)
    assert (config["num_key_value_heads"], config["rope_theta"], config["head_dim"]) == (2, 10000.0, 4)


def test_per_layer_kv_head_counts(tmp_path: Path) -> None:
    array = GGUFValueType.ARRAY
    same = _write(
        tmp_path / "same.gguf",
        drop=("llama.attention.head_count_kv",),
        extra={"llama.attention.head_count_kv": ([1, 1], array, GGUFValueType.UINT32)},
    )
    assert hf_config(GGUFFile(same), same)["num_key_value_heads"] == 1
    mixed = _write(
        tmp_path / "mixed.gguf",
        drop=("llama.attention.head_count_kv",),
        extra={"llama.attention.head_count_kv": ([1, 2], array, GGUFValueType.UINT32)},
    )
    with pytest.raises(ValueError, match=r"different KV head counts \(\[1, 2\]\)"):
        hf_config(GGUFFile(mixed), mixed)


def test_a_split_shard_is_refused_naming_the_split(tmp_path: Path) -> None:
    split = {
        "split.no": (0, GGUFValueType.UINT16, None),
        "split.count": (2, GGUFValueType.UINT16, None),
        "split.tensors.count": (4, GGUFValueType.INT32, None),
    }
    path = _write(tmp_path / "m-00001-of-00002.gguf", extra=split)
    with pytest.raises(ValueError, match=r"shard 1 of a GGUF file split in 2.*llama-gguf-split --merge"):
        prepare_gguf_model_dir(path, tmp_path / "cache")
    (tmp_path / "m-00002-of-00002.gguf").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="shards of a split GGUF file"):
        find_gguf_file(tmp_path)


def test_a_file_without_token_embeddings_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.gguf", embedding=False)
    with pytest.raises(ValueError, match=r"no token embedding tensor \(token_embd\.weight\)"):
        hf_config(GGUFFile(path), path)


def test_tokenizer_metadata_that_cannot_work_is_named(tmp_path: Path) -> None:
    no_merges = _write(tmp_path / "no-merges.gguf", drop=("merges",))
    with pytest.raises(ValueError, match=r"has no merges \(tokenizer\.ggml\.merges\)"):
        prepare_gguf_model_dir(no_merges, tmp_path / "cache")
    short = _write(tmp_path / "short.gguf", embedding_rows=len(TOKENS) - 2)
    with pytest.raises(ValueError, match=r"has 8 tokens but token_embd\.weight only 6 rows"):
        prepare_gguf_model_dir(short, tmp_path / "cache")


def test_end_of_generation_ids_are_llama_cpps(tmp_path: Path) -> None:
    # EOS, the stated EOT, and turn ends llama.cpp knows by name (unstated here: <|im_end|>).
    stated = _write(
        tmp_path / "eot.gguf", extra={"tokenizer.ggml.eot_token_id": (7, GGUFValueType.UINT32, None)}
    )
    assert end_of_generation_ids(GGUFFile(stated)) == [1, 7, 3]
    plain = _write(tmp_path / "plain.gguf", tokens=["<s>", "</s>", "a", "b"], embedding_rows=4)
    assert end_of_generation_ids(GGUFFile(plain)) == 1


def test_the_served_tokenizer_stops_at_the_end_of_turn(tmp_path: Path) -> None:
    # The builder's file states <|im_end|> as its EOT, as the HF model's generation config ends on it.
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "Q8_0")
    ours = Tokenizer.from_pretrained(prepare_gguf_model_dir(gguf_path, tmp_path / "cache"))
    original = Tokenizer.from_pretrained(tmp_path / "hf")
    assert set(ours.eos_token_ids) == set(original.eos_token_ids) == {1, 3}


def test_a_missing_gguf_name_is_a_missing_file_not_a_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"model file 'model-q4_k_m\.gguf' does not exist"):
        resolve_model_dir("model-q4_k_m.gguf")
