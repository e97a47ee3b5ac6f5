"""Train and write a small byte-level BPE tokenizer offline (for the demo model and the tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchlm.tokenizer.chat_template import DEFAULT_CHAT_TEMPLATE
from batchlm.tokenizer.corpus import corpus_lines

if TYPE_CHECKING:
    import tokenizers

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# The trainer gives special tokens the first ids, in this order: BOS=0, EOS=1, <|im_start|>=2, <|im_end|>=3.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
DEFAULT_VOCAB_SIZE = 2048
# 256 byte symbols plus the special tokens: a byte-level BPE can never be smaller.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def special_token_ids() -> dict[str, int]:
    """Ids of the special tokens in every tokenizer build_tokenizer writes."""
    return {token: index for index, token in enumerate(SPECIAL_TOKENS)}


def build_tokenizer(
    path: Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`.

    The tokenizer is a byte-level BPE (so any Unicode string round-trips) trained on the built-in
    corpus; training is deterministic, so the files are byte-identical from run to run. Encoding with
    special tokens prepends BOS. `chat_template=None` writes no template (like a base model).
    Raises ValueError when `vocab_size` is outside what the corpus supports.
    """
    backend = _train_backend(vocab_size)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "pad_token": None,
        "unk_token": None,
        # Byte-level BPE text must come back exactly as encoded; clean-up would drop spaces.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)


def _train_backend(vocab_size: int) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + special tokens), got {vocab_size}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte is in the vocabulary even if the corpus lacks it: no input is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_lines(), trainer)
    trained = backend.get_vocab_size()
    if trained != vocab_size:
        raise ValueError(
            f"the built-in corpus supports a vocabulary of at most {trained} tokens, asked for {vocab_size}"
        )
    bos_id = special_token_ids()[BOS_TOKEN]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return backend


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
