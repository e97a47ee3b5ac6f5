"""The text model's tensors of a multimodal checkpoint (Gemma 3, Mistral 3): the vision tower and
projector are skipped, the language model's names become those of the text-only family."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from batchlm.layers.quantization.base import LoadedWeight

# Where multimodal checkpoints keep the language model: transformers 5 writes the first form,
# older exports the second.
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."))
_TEXT_HEAD = {"language_model.lm_head.weight": "lm_head.weight"}
_VISION_PARTS = ("vision_tower.", "multi_modal_projector.")


def text_model_tensors(
    weights: Iterable[tuple[str, LoadedWeight]],
) -> Iterator[tuple[str, LoadedWeight]]:
    """(name, tensor) of the language model only, under the text-only family's names."""
    for name, tensor in weights:
        if any(part in name for part in _VISION_PARTS):
            continue
        for prefix, ours in _TEXT_PREFIXES:
            if name.startswith(prefix):
                name = ours + name[len(prefix) :]
                break
        yield _TEXT_HEAD.get(name, name), tensor
