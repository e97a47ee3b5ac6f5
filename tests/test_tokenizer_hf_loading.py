"""load_hf_tokenizer: a plain fast tokenizer of a Llama model loads directly and equals AutoTokenizer's;
every other directory goes through AutoTokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchlm.tokenizer.builder import build_tokenizer
from batchlm.tokenizer.hf_loading import load_hf_tokenizer, loads_directly

SAMPLES = [
    "Hello, world!",
    "  spaces\tand\nlines ",
    "émoji 🙂 and ümlauts",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(directory)
    return directory


def model_dir(tmp_path: Path, files: Path, model_type: str = "llama", **tokenizer_changes: Any) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((files / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(tokenizer_changes)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["X"]}))
    return tmp_path


def describe(hf: Any) -> dict[str, Any]:
    """What the engine relies on: class, vocabulary, specials, encodings, decodings, chat template."""
    return {
        "class": type(hf).__name__,
        "len": len(hf),
        "specials": (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, tuple(hf.all_special_ids)),
        "encode": [hf.encode(text) for text in SAMPLES],
        "encode_plain": [hf.encode(text, add_special_tokens=False) for text in SAMPLES],
        "tokens": hf.convert_ids_to_tokens(list(range(len(hf)))),
        "decode": [hf.decode(ids) for ids in ([5, 300, 1000], [0, 7, 1], list(range(40)))],
        "template": hf.chat_template,
    }


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "TokenizersBackend"])
def test_direct_load_equals_auto_tokenizer(
    tokenizer_files: Path, tmp_path: Path, tokenizer_class: str
) -> None:
    from transformers import AutoTokenizer

    directory = model_dir(tmp_path, tokenizer_files, tokenizer_class=tokenizer_class)
    assert loads_directly(directory)
    assert describe(load_hf_tokenizer(directory)) == describe(AutoTokenizer.from_pretrained(str(directory)))


def test_direct_load_does_not_call_auto_tokenizer(
    tokenizer_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("AutoTokenizer was used")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    assert len(load_hf_tokenizer(model_dir(tmp_path, tokenizer_files))) == 2048


@pytest.mark.parametrize(
    ("model_type", "changes", "why"),
    [
        ("qwen2", {}, "Qwen's tokenizer resolution has its own cases"),
        ("mistral", {}, "Mistral tokenizers may resolve to MistralCommonBackend"),
        ("llama", {"tokenizer_class": "LlamaTokenizer"}, "a model-specific class"),
        ("llama", {"auto_map": {"AutoTokenizer": ["x.Tok", None]}}, "custom code"),
    ],
)
def test_other_directories_go_through_auto_tokenizer(
    tokenizer_files: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model_type: str,
    changes: dict,
    why: str,
) -> None:
    directory = model_dir(tmp_path, tokenizer_files, model_type, **changes)
    assert not loads_directly(directory), why
    calls: list[tuple[str, bool]] = []

    import transformers

    monkeypatch.setattr(
        transformers.AutoTokenizer,
        "from_pretrained",
        lambda path, trust_remote_code=False: calls.append((path, trust_remote_code)) or "auto",
    )
    assert load_hf_tokenizer(directory, trust_remote_code=True) == "auto"
    assert calls == [(str(directory), True)]


def test_missing_config_or_tokenizer_json_is_left_to_auto_tokenizer(
    tokenizer_files: Path, tmp_path: Path
) -> None:
    directory = model_dir(tmp_path, tokenizer_files)
    (directory / "config.json").unlink()
    assert not loads_directly(directory)
    directory = model_dir(tmp_path, tokenizer_files)
    (directory / "tokenizer.json").unlink()
    assert not loads_directly(directory)
    (directory / "tokenizer_config.json").write_text("{broken")
    assert not loads_directly(directory)
