"""A GGUF file's tokenizer, derived once into the cache: AutoTokenizer with its model-type read
answered from our own reader gives the files AutoTokenizer gives on its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import transformers.modeling_gguf_pytorch_utils as gguf_utils
from transformers import AutoTokenizer

from batchlm.models.gguf_model_dir import prepare_gguf_model_dir, transformers_model_type
from gguf_builder import write_tiny_gguf
from test_gguf_loading import MIXTRAL, PHI4_MINI, QWEN3_MOE
from test_models_granite import GRANITE

CASES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "phi3": PHI4_MINI,
    "qwen3_moe": QWEN3_MOE,
    "mixtral": MIXTRAL,
    "gemma2": {},
    "gemma3_text": {},
}
# Architectures whose files transformers' GGUF loading refuses (on its model-type read), though its
# tokenizer conversion goes by the file's tokenizer model, not its architecture.
UNKNOWN_TO_TRANSFORMERS: dict[str, dict[str, Any]] = {
    "granite": GRANITE,
    "olmo2": {"pad_token_id": 0},
    "smollm3": {"pad_token_id": 0},
    "glm4": {"pad_token_id": 0},
    "exaone4": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "seed_oss": {},
    "gpt_oss": {},
}
TEXTS = [
    "Hello, world!",
    "  two  spaces and 12345 digits",
    "<|im_start|>user\nhi<|im_end|>",
    "naïve café 日本",
]


def saved_files(directory: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for path in sorted(directory.iterdir())
        if path.name
        in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
    }


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_the_derived_tokenizer_is_autotokenizers_own(
    tmp_path: Path, model_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", model_type, "F32", overrides=CASES[model_type])
    reads: list[str] = []
    slow_read = gguf_utils.load_gguf_checkpoint

    def counting(path: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(str(path))
        return slow_read(path, *args, **kwargs)

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", counting)
    try:
        expected = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    except Exception as failure:  # a tokenizer transformers cannot convert: ours must fail too
        with pytest.raises(ValueError, match="could not build a tokenizer"):
            prepare_gguf_model_dir(gguf_path, tmp_path / "cache")
        pytest.skip(f"transformers builds no tokenizer from this file: {failure}")
    expected.save_pretrained(str(tmp_path / "expected"))
    assert reads  # on its own, AutoTokenizer reads the whole metadata for the model type

    reads.clear()
    derived = prepare_gguf_model_dir(gguf_path, tmp_path / "cache")
    assert reads == []  # that read was answered, not made
    assert gguf_utils.load_gguf_checkpoint is counting  # and the function put back
    assert saved_files(derived) == saved_files(tmp_path / "expected")
    assert "tokenizer.json" in saved_files(derived)


@pytest.mark.parametrize("model_type", sorted(UNKNOWN_TO_TRANSFORMERS))
def test_architectures_transformers_does_not_load_still_get_the_files_tokenizer(
    tmp_path: Path, model_type: str
) -> None:
    # The model-type read answered, the file's tokenizer converts: it encodes as the model's own.
    overrides = UNKNOWN_TO_TRANSFORMERS[model_type]
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", model_type, "F32", overrides=overrides)
    derived = AutoTokenizer.from_pretrained(prepare_gguf_model_dir(gguf_path, tmp_path / "cache"))
    original = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert derived.encode(text, add_special_tokens=False) == original.encode(
            text, add_special_tokens=False
        )
    assert derived.chat_template == original.chat_template


def test_model_types_as_transformers_names_them() -> None:
    assert transformers_model_type("qwen3moe", "Qwen3-30B-A3B") == "qwen3_moe"
    assert transformers_model_type("qwen2moe", None) == "qwen2_moe"
    assert transformers_model_type("llama", "mistral") == "mistral"
    assert transformers_model_type("llama", "Mistral-7B-Instruct") == "llama"  # only the exact name
    assert transformers_model_type("gemma3", "gemma-3-4b") == "gemma3"
    assert transformers_model_type("gpt-oss", "Gpt-Oss-20B") == "gpt_oss"


def test_a_derived_directory_missing_a_file_is_rebuilt(tmp_path: Path) -> None:
    # A file deleted from the cache entry once made every later start serve the incomplete entry (the
    # new build could not take its name) and fail on the tokenizer.
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "F32")
    derived = prepare_gguf_model_dir(gguf_path, tmp_path / "cache")
    expected = saved_files(derived)
    (derived / "tokenizer.json").unlink()
    assert prepare_gguf_model_dir(gguf_path, tmp_path / "cache") == derived
    assert saved_files(derived) == expected
    assert [p.name for p in derived.parent.iterdir()] == [derived.name]  # no staging or discarded copies


def test_a_tokenizer_module_that_imported_the_read_by_name_is_answered_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As transformers 5.17 binds it: `from ...modeling_gguf_pytorch_utils import load_gguf_checkpoint`
    at the tokenizer module's import, so patching the defining module alone would not reach its call
    (the whole metadata would be read, slowly, for the model type)."""
    import transformers.models.auto.tokenization_auto as tokenization_auto

    from batchlm.models.gguf_model_dir import _model_type_known

    monkeypatch.setattr(
        tokenization_auto, "load_gguf_checkpoint", gguf_utils.load_gguf_checkpoint, raising=False
    )
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "gpt_oss", "F32").resolve()
    with _model_type_known(gguf_path, "gpt_oss"):
        answer = tokenization_auto.load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    assert answer == {"config": {"model_type": "gpt_oss"}}
    assert tokenization_auto.load_gguf_checkpoint is gguf_utils.load_gguf_checkpoint  # put back
