"""Load a Hugging Face tokenizer, skipping AutoTokenizer's class resolution where its answer is known.

AutoTokenizer builds the model's transformers config to choose a tokenizer class, and importing a
config class can cost seconds: transformers 5.17 imports its generation stack with it (torch._dynamo,
torch.distributed, scikit-learn when installed), which made the tokenizer the last thing `batchlm
serve` waited for on the GPU machine (BENCHMARKS.md, "Figures that left the source"). For a plain fast tokenizer (tokenizer_config.json
names PreTrainedTokenizerFast or TokenizersBackend, no custom code) of a Llama model, AutoTokenizer
ends up loading that very class from the directory, so it is loaded directly. Every other tokenizer
(Qwen's and Mistral's own classes, remote code, no config.json) still goes through AutoTokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tokenizer classes AutoTokenizer resolves to the generic fast tokenizer for DIRECT_MODEL_TYPES.
DIRECT_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
# Model types whose tokenizer resolution has no special case for those classes in AutoTokenizer.
DIRECT_MODEL_TYPES = frozenset({"llama"})


def load_hf_tokenizer(directory: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The transformers tokenizer of a local model directory (what AutoTokenizer.from_pretrained gives)."""
    if loads_directly(directory):
        from transformers import PreTrainedTokenizerFast

        fast: PreTrainedTokenizerBase = PreTrainedTokenizerFast.from_pretrained(str(directory))
        return fast
    from transformers import AutoTokenizer

    auto: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
        str(directory), trust_remote_code=trust_remote_code
    )
    return auto


def loads_directly(directory: Path) -> bool:
    """True when AutoTokenizer would load the generic fast tokenizer: a tokenizer.json, a
    tokenizer_config.json naming one of DIRECT_CLASSES without an auto_map, and a config.json whose
    model_type is one of DIRECT_MODEL_TYPES."""
    directory = Path(directory)
    tokenizer_config = _read_json(directory / "tokenizer_config.json")
    model_config = _read_json(directory / "config.json")
    if tokenizer_config is None or model_config is None or not (directory / "tokenizer.json").is_file():
        return False
    if "auto_map" in tokenizer_config or "auto_map" in model_config:
        return False
    return (
        tokenizer_config.get("tokenizer_class") in DIRECT_CLASSES
        and model_config.get("model_type") in DIRECT_MODEL_TYPES
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
