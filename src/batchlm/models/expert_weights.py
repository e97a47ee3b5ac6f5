"""Route checkpoint tensors of experts into the stacked FusedMoE parameters.

Published checkpoints store one tensor per expert and projection (`...experts.7.gate_proj.weight`,
Mixtral's `w1`/`w3`/`w2`); transformers' own stacked form (`...experts.gate_up_proj`) loads too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

from torch import nn

from batchlm.layers.moe import DOWN, GATE, UP, FusedMoE
from batchlm.layers.quantization.base import LoadedWeight

_PER_EXPERT = re.compile(r"^(?P<prefix>.+)\.(?P<expert>\d+)\.(?P<part>\w+)\.weight$")
_STACKED = re.compile(r"^(?P<prefix>.+)\.(?P<param>gate_up_proj|down_proj)$")
_PART_LABELS = {GATE: "gate", UP: "up", DOWN: "down"}


class ExpertTensorRouter:
    """Takes the expert tensors out of a checkpoint stream and loads them into the model's experts."""

    def __init__(self, model: nn.Module, part_names: Mapping[str, int]) -> None:
        self.layers = {path: m for path, m in model.named_modules() if isinstance(m, FusedMoE)}
        self.part_names = dict(part_names)

    def take(self, name: str, tensor: LoadedWeight) -> bool:
        """Load `name` if it is an expert tensor of ours; False for every other tensor."""
        per_expert = _PER_EXPERT.match(name)
        if per_expert and per_expert["prefix"] in self.layers and per_expert["part"] in self.part_names:
            layer = self.layers[per_expert["prefix"]]
            layer.load_expert(name, int(per_expert["expert"]), self.part_names[per_expert["part"]], tensor)
            return True
        stacked = _STACKED.match(name)
        if stacked and stacked["prefix"] in self.layers:
            self.layers[stacked["prefix"]].load_weight(name, stacked["param"], tensor)
            return True
        return False

    def others(self, weights: Iterable[tuple[str, LoadedWeight]]) -> Iterator[tuple[str, LoadedWeight]]:
        """The tensors that are not experts', loading the experts' on the way."""
        return ((name, tensor) for name, tensor in weights if not self.take(name, tensor))

    def stacked_names(self) -> set[str]:
        """Our stacked parameters' names, which the generic loader would otherwise call missing."""
        return {f"{path}.{param}" for path in self.layers for param in ("gate_up_proj", "down_proj")}

    def missing(self) -> list[str]:
        """Checkpoint names of the expert tensors nothing loaded."""
        label_to_name = {part: name for name, part in self.part_names.items()}
        return [
            f"{path}.{expert}.{label_to_name.get(part, _PART_LABELS[part])}.weight"
            for path, layer in self.layers.items()
            for expert, part in layer.missing_parts()
        ]
