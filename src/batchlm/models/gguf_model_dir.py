"""Serve a GGUF file like a model directory: config.json, generation_config.json and the tokenizer are
derived from its metadata once into the cache, beside a pointer to the file the weights load from.

The rest of the engine (config view, tokenizer loading in the front end, tensor-parallel workers)
then reads a model directory as always; only the loader looks at the pointer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchlm.config import cache_root, is_unwritable
from batchlm.models.cache_entry import build_entry, use_version
from batchlm.models.gguf_file import hf_config, open_gguf
from batchlm.models.gguf_reader import GGUFFile

logger = logging.getLogger(__name__)

# The pointer file: {"gguf_file": absolute path}.
GGUF_SOURCE_FILE = "gguf_source.json"
# Bump when what is derived changes, so stale cache entries are not reused.
DERIVED_VERSION = "gguf-v4"
# The sampling values a GGUF file may recommend (llama.cpp's general.sampling keys), as
# generation_config.json names them.
_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}
# general.architecture -> the model type transformers' GGUF loading names, where the two differ.
_TRANSFORMERS_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss"}
# Tokens llama.cpp ends a generation at by their text (llama-vocab.cpp), beside the ids the file states.
_END_OF_GENERATION_TOKENS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
    }
)
# llama.cpp's split shards: model-00001-of-00003.gguf.
_SPLIT_SHARD = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
_DERIVED_FILES = ("config.json", "generation_config.json", "tokenizer.json", GGUF_SOURCE_FILE)
# The chunks of tensor data a file's key reads: a file whose weights differ differs in them too.
KEY_SAMPLES, KEY_SAMPLE_BYTES = 16, 64 * 1024


def find_gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` means: the file itself, or the one *.gguf of a directory without
    safetensors weights; None when it is not a GGUF model. ValueError for several .gguf files."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        if all(_SPLIT_SHARD.search(p.name) for p in found):
            raise ValueError(
                f"{path} holds the shards of a split GGUF file ({names}); batchlm loads single files: merge "
                "them first (llama.cpp's `llama-gguf-split --merge <first shard> <merged>.gguf`)"
            )
        raise ValueError(f"{path} holds several GGUF files ({names}); pass the one to serve")
    return found[0] if found else None


def gguf_source(model_dir: Path) -> Path | None:
    """The GGUF file a derived model directory loads its weights from, or None for other directories."""
    pointer = Path(model_dir) / GGUF_SOURCE_FILE
    if not pointer.is_file():
        return None
    return Path(json.loads(pointer.read_text())["gguf_file"])


def prepare_gguf_model_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The derived model directory of `gguf_path`, built on first use (atomically: a racing or
    interrupted build never leaves a half directory under the real name). The directories of older
    DERIVED_VERSIONs that no running process uses are removed first."""
    gguf_path = gguf_path.expanduser().resolve()
    key = file_key(gguf_path)
    cache = Path(cache_dir or cache_root())
    use_version(cache, DERIVED_VERSION)
    target = cache / DERIVED_VERSION / f"{gguf_path.stem}-{key}"

    def build(staging: Path) -> None:
        logger.info("reading the model config and tokenizer from %s (once; cached in %s)", gguf_path, target)
        _write_derived(gguf_path, staging)

    build_entry(target, _DERIVED_FILES, build, "derived model directory")
    _point_at(target, gguf_path, key)
    return target


def file_key(path: Path) -> str:
    """The identity of a GGUF file's contents, read in milliseconds whatever its size: its size, its
    whole header (the metadata and tensor table, all that the derived files come from) and chunks
    sampled evenly across its tensor data. A copy or a moved file has the key of its original; a
    file whose metadata changed never has the key of the old one."""
    size = path.stat().st_size
    data_start = open_gguf(path).data_start
    digest = hashlib.sha256(f"{size}|".encode())
    with path.open("rb") as file:
        digest.update(file.read(data_start))
        # From the first tensor's first bytes to the last one's last.
        span = max(size - data_start - KEY_SAMPLE_BYTES, 0)
        for index in range(KEY_SAMPLES):
            file.seek(data_start + span * index // (KEY_SAMPLES - 1))
            digest.update(file.read(KEY_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def _point_at(target: Path, gguf_path: Path, key: str) -> None:
    """Make the entry's pointer name `gguf_path`: an entry made for a copy of the file elsewhere (a
    moved cache, a copied model) names the copy, which may since have gone."""
    if gguf_source(target) == gguf_path:
        return
    staging = target / f".{GGUF_SOURCE_FILE}.{os.getpid()}.{threading.get_ident()}"
    try:
        _write_json(staging, {"gguf_file": str(gguf_path)})
        staging.replace(target / GGUF_SOURCE_FILE)
    except OSError as error:
        with contextlib.suppress(OSError):  # a read-only file system refuses even this
            staging.unlink(missing_ok=True)
        recorded = gguf_source(target)
        # A cache that cannot be written (a read-only image) may still name a file of these contents.
        if (
            not is_unwritable(error)
            or recorded is None
            or not recorded.is_file()
            or file_key(recorded) != key
        ):
            raise
        logger.info("cannot point %s at %s (%s); loading its copy %s", target, gguf_path, error, recorded)


def _write_derived(gguf_path: Path, out: Path) -> None:
    reader = open_gguf(gguf_path)
    config = hf_config(reader, gguf_path)
    _write_json(out / "config.json", config)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": end_of_generation_ids(reader)}
    for key, name in _SAMPLING_KEYS.items():
        if (value := reader.metadata(key)) is not None:
            generation[name] = value
    _write_json(out / "generation_config.json", generation)
    _check_tokenizer_metadata(reader, gguf_path, config["vocab_size"])
    model_type = transformers_model_type(
        str(reader.metadata("general.architecture")), reader.metadata("general.name")
    )
    del reader  # the tokenizer conversion maps the file again
    _write_tokenizer(gguf_path, out, model_type)
    _write_json(out / GGUF_SOURCE_FILE, {"gguf_file": str(gguf_path)})


def end_of_generation_ids(reader: GGUFFile) -> int | list[int] | None:
    """The ids that end a generation, as llama.cpp takes them: the file's EOS, EOT (end of turn: Llama
    3's <|eot_id|>, Phi-3's <|end|>) and EOM ids, and every token named as one of the turn ends
    llama.cpp recognizes by name (Gemma's <end_of_turn>, ChatML's <|im_end|>), which converters often
    do not record. One id as an int, several as a list (generation_config.json's two forms)."""
    stated = [reader.metadata(f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot", "eom")]
    tokens = reader.metadata("tokenizer.ggml.tokens") or []
    named = [token_id for token_id, token in enumerate(tokens) if token in _END_OF_GENERATION_TOKENS]
    unique = list(dict.fromkeys(int(i) for i in [*stated, *named] if i is not None))
    if not unique:
        return None
    return unique[0] if len(unique) == 1 else unique


def _check_tokenizer_metadata(reader: GGUFFile, gguf_path: Path, embedding_rows: int) -> None:
    """ValueError naming what the tokenizer metadata lacks or contradicts, before transformers' own
    conversion fails on it less clearly."""
    model = reader.metadata("tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{gguf_path} carries no tokenizer (tokenizer.ggml.* metadata)")
    tokens = reader.metadata("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{gguf_path}: its tokenizer metadata has no token list (tokenizer.ggml.tokens)")
    if model == "gpt2" and not reader.metadata("tokenizer.ggml.merges"):
        raise ValueError(
            f"{gguf_path}: its BPE tokenizer (tokenizer.ggml.model 'gpt2') has no merges (tokenizer.ggml.merges)"
        )
    if len(tokens) > embedding_rows:
        raise ValueError(
            f"{gguf_path}: its tokenizer has {len(tokens)} tokens but token_embd.weight only {embedding_rows} "
            "rows; the file's vocabulary and weights do not match"
        )


def transformers_model_type(architecture: str, name: object) -> str:
    """The model type transformers' GGUF loading gives a file of this architecture and general.name
    (its tokenizer class follows from it)."""
    if architecture == "llama" and name == "mistral":
        return "mistral"
    return _TRANSFORMERS_MODEL_TYPES.get(architecture, architecture)


# Where transformers keeps the GGUF metadata read AutoTokenizer calls: its own module, and (in some
# releases) a name the tokenizer module imported from it at its own import.
_METADATA_READERS = ("transformers.modeling_gguf_pytorch_utils", "transformers.models.auto.tokenization_auto")


@contextlib.contextmanager
def _model_type_known(gguf_path: Path, model_type: str) -> Iterator[None]:
    """AutoTokenizer reads a GGUF file's whole metadata through the gguf package's reader only to
    learn its model type, which picks the tokenizer class: seconds for a vocabulary of 150k tokens.
    While this is open, that read of this file answers with the model type already known, under
    every name AutoTokenizer may call it by; every other call goes through as before."""
    import importlib

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "load_gguf_checkpoint", None)
    if original is None:
        yield
        return

    def answered(
        path: Any, return_tensors: Any = False, model_to_load: Any = None, torch_dtype: Any = None
    ) -> Any:
        if not return_tensors and model_to_load is None and Path(str(path)).resolve() == gguf_path:
            return {"config": {"model_type": model_type}}
        return original(path, return_tensors, model_to_load, torch_dtype)

    modules = [importlib.import_module(name) for name in _METADATA_READERS]
    bound = [module for module in modules if getattr(module, "load_gguf_checkpoint", None) is original]
    for module in bound:
        setattr(module, "load_gguf_checkpoint", answered)  # noqa: B010 (a name mypy cannot see)
    try:
        yield
    finally:
        for module in bound:
            setattr(module, "load_gguf_checkpoint", original)  # noqa: B010


def _write_tokenizer(gguf_path: Path, out: Path, model_type: str) -> None:
    # transformers builds a fast tokenizer (and its chat template) from the GGUF metadata.
    import transformers
    from transformers import AutoTokenizer

    try:
        with _model_type_known(gguf_path, model_type):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as err:  # unknown tokenizer models and damaged metadata raise many types
        # transformers' GGUF readers change between releases (5.17 misreads gpt-oss's rope.scaling.*
        # keys, which 5.24 reads): the version helps the user tell a damaged file from an old reader.
        raise ValueError(
            f"could not build a tokenizer from the metadata of {gguf_path} with transformers "
            f"{transformers.__version__}: {err}"
        ) from err
    tokenizer.save_pretrained(str(out))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
