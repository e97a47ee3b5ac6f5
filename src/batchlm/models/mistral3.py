"""Mistral 3 multimodal checkpoints (Mistral Small 3.1 / 3.2, Ministral 3): the text model they hold,
Mistral's or Ministral 3's (models/ministral3.py).

The config nests the language model's settings in `text_config`; the checkpoint holds the vision
tower and projector beside it, which are skipped, so the model serves text prompts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from batchlm.layers.quantization.base import LoadedWeight
from batchlm.models.hf_config import field_of, text_config_of
from batchlm.models.llama import BlockOptions, MistralForCausalLM
from batchlm.models.ministral3 import Ministral3ModelConfig, ministral3_options, read_ministral3_config
from batchlm.models.model_config import ModelConfig
from batchlm.models.multimodal_text import text_model_tensors

# The text models this class runs: transformers' Mistral (Mistral Small 3.1/3.2) and Ministral 3, whose
# queries are scaled by position.
TEXT_MODEL_TYPES = frozenset({"mistral", "ministral3"})
MINISTRAL3 = "ministral3"


class Mistral3ForConditionalGeneration(MistralForCausalLM):
    """The text model of a Mistral3ForConditionalGeneration checkpoint, run as Mistral or Ministral 3."""

    @classmethod
    def read_config(cls, hf_config: Any) -> ModelConfig:
        text = text_config_of(hf_config)
        text_type = field_of(text, "model_type")
        if text_type not in TEXT_MODEL_TYPES:
            raise ValueError(
                f"unsupported Mistral 3 text model {text_type!r}: batchlm serves the text model of "
                f"Mistral3ForConditionalGeneration checkpoints whose text_config is {sorted(TEXT_MODEL_TYPES)}"
            )
        config = replace(super().read_config(hf_config), tie_word_embeddings=_tied(hf_config, text))
        return read_ministral3_config(config, hf_config) if text_type == MINISTRAL3 else config

    @classmethod
    def block_options(cls, config: ModelConfig) -> BlockOptions:
        options = super().block_options(config)
        return ministral3_options(options) if isinstance(config, Ministral3ModelConfig) else options

    def checkpoint_tensors(
        self, weights: Iterable[tuple[str, LoadedWeight]]
    ) -> Iterable[tuple[str, LoadedWeight]]:
        return text_model_tensors(weights)


def _tied(hf_config: Any, text: Any) -> bool:
    # transformers 5's Mistral3Config says tie_word_embeddings=True by default, yet the published
    # checkpoints hold their own LM head (which transformers then keeps, untied) and the text config
    # says False: the head is tied only where both configs say so.
    outer = getattr(hf_config, "tie_word_embeddings", True)
    return bool(outer) and bool(field_of(text, "tie_word_embeddings", False))
