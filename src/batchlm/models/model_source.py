"""Where a model comes from: its local directory (the built-in default, a GGUF file's derived directory,
a local path or a hub download), its tokenizer, and the name it is served under."""

from __future__ import annotations

import threading
from pathlib import Path

from batchlm.config import EngineConfig
from batchlm.sampling_defaults import GENERATION_CONFIG_FILE, generation_config_dir
from batchlm.tokenizer.eos_ids import model_config_files
from batchlm.tokenizer.tokenizer import Tokenizer


def prepare_model_dir(config: EngineConfig, cancel: threading.Event | None = None) -> Path:
    """The local directory of the model: the built-in default, a GGUF file's derived directory, a
    local path, or a hub download. Setting `cancel` stops the built-in model's download."""
    if config.built_in_model:
        from batchlm.models.default_model import ensure_default_model

        return ensure_default_model(cancel=cancel)
    from batchlm.models.gguf_model_dir import find_gguf_file, prepare_gguf_model_dir
    from batchlm.models.hub import resolve_model_dir

    gguf_file = find_gguf_file(Path(config.model).expanduser())
    if gguf_file is not None:
        return prepare_gguf_model_dir(gguf_file)

    model_dir = resolve_model_dir(config.model, config.revision)
    if not (model_dir / "config.json").is_file():
        # Said before the tokenizer is read from it, whose error listed tokenizer files instead.
        raise ValueError(f"model directory {config.model!r} holds neither config.json nor a GGUF file")
    return model_dir


def load_tokenizer(config: EngineConfig, model_dir: Path) -> Tokenizer:
    """The tokenizer from --tokenizer (a path or hub id) or the model directory, with any template
    override, and the model's EOS ids (eos_config_files)."""
    source = model_dir
    if config.tokenizer:
        from batchlm.models.hub import resolve_model_dir

        source = resolve_model_dir(config.tokenizer, config.revision)
    return Tokenizer.from_pretrained(
        source,
        chat_template=config.chat_template,
        trust_remote_code=config.trust_remote_code,
        eos_files=eos_config_files(config, model_dir),
    )


def eos_config_files(config: EngineConfig, model_dir: Path) -> list[Path]:
    """The files whose first eos_token_id ends generation beside the tokenizer's EOS: a
    --generation-config directory's file, then the model's generation_config.json and config.json. As
    in vLLM, the model's and not those of a --tokenizer directory, which rarely has them."""
    files = model_config_files(model_dir)
    if (other := generation_config_dir(config.generation_config)) is not None:
        files.insert(0, other / GENERATION_CONFIG_FILE)
    return files


def served_model_name(config: EngineConfig, model_dir: Path | None = None) -> str:
    """--served-model-name, else the built-in model's own name (the real default or, where it fell
    back, the random demo: `model_dir` tells which), else --model as given."""
    if config.served_model_name:
        return config.served_model_name
    if config.built_in_model:
        from batchlm.models.default_model import default_model_name

        return default_model_name(model_dir)
    return config.model.rstrip("/")
