"""PEFT LoRA adapters merged into the base weights at load time: W += scale * B @ A.

scale is lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), with r and lora_alpha taken per module
from rank_pattern / alpha_pattern where they name it. Merging happens on the HF-named tensors as they
stream from the checkpoint, before any fusing or tensor-parallel sharding, so an adapter names the
modules the checkpoint has (Phi-3's fused qkv_proj and gate_up_proj included). DoRA then rescales
each output row to its trained magnitude (W' = m * W' / ||W'||, row-wise, as PEFT merges it).
Embedding LoRA (lora_embedding_A/B) merges the same way, transposed. Whole tensors the adapter saves
(modules_to_save, biases trained with bias="all"/"lora_only", an lm_head's base_layer) replace the
checkpoint's, and trainable_token_indices' rows replace the embedding's, as PEFT loads them over the
base model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batchlm.models.lora_config import rank_settings, read_adapter_config

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
# The tensors an adapter may not touch when the input and output embeddings are one (by the end of
# their names: a multimodal checkpoint nests them under language_model).
TIED_TENSORS = {"lm_head.weight": "lm_head", "embed_tokens.weight": "embed_tokens"}
# transformers names a multimodal model's text modules model.language_model.* (the names PEFT saves)
# but writes its checkpoints, as older exports did, with language_model.model.*: an adapter name
# the checkpoint lacks is looked up under its other form.
NAME_ALIASES = (
    ("model.language_model.", "language_model.model."),
    ("language_model.model.", "model.language_model."),
    ("lm_head.", "language_model.lm_head."),
)


@dataclass(frozen=True)
class LoraDelta:
    """One adapted linear layer: delta W = scale * B @ A."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scale: float
    # DoRA's lora_magnitude_vector [out_features]; None: plain LoRA.
    magnitude: torch.Tensor | None = None

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged float32 weight."""
        merged = weight.float() + self.scale * (self.b @ self.a)
        if self.magnitude is None:
            return merged
        norms: torch.Tensor = torch.linalg.norm(merged, dim=1)
        return (self.magnitude / norms).unsqueeze(1) * merged


@dataclass
class LoraAdapter:
    """A loaded adapter: the deltas keyed by the HF name of the weight they modify, the whole
    tensors it saved in place of the checkpoint's and the rows it replaces (trainable_token_indices:
    row indices and their values). Replacements apply first, then rows, then deltas."""

    path: Path
    deltas: dict[str, LoraDelta]
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # Names merged so far (filled by merge_lora).
    merged: set[str] = field(default_factory=set)

    def targets(self) -> set[str]:
        return {*self.deltas, *self.replaced, *self.rows}

    def check_targets(self, checkpoint_tensor_names: set[str], tied_embeddings: bool) -> None:
        """Fail before loading if the adapter adapts weights the base checkpoint does not have
        (after naming its targets as the checkpoint does)."""
        self._rename_to(checkpoint_tensor_names)
        # Trained token rows of a tied embedding are PEFT's one exception: it ties them to the head.
        untied = {*self.deltas, *self.replaced, *(n for n in self.rows if _tied_part(n) != "embed_tokens")}
        shared = sorted({part for part in map(_tied_part, untied) if part is not None})
        if tied_embeddings and shared:
            # One tensor serves both ends here; PEFT changes only one of them.
            raise ValueError(
                f"LoRA adapter {self.path}: adapting {' and '.join(shared)} of a model with tied "
                "embeddings is not supported"
            )
        unknown = sorted(name for name in self.targets() if name not in checkpoint_tensor_names)
        if unknown:
            modules = ", ".join(n.removesuffix(".weight") for n in unknown[:5])
            raise ValueError(
                f"LoRA adapter {self.path} does not match the base model: it adapts module(s) the model lacks: {modules}"
            )

    def _rename_to(self, checkpoint_tensor_names: set[str]) -> None:
        def checkpoint_name(name: str) -> str:
            if name in checkpoint_tensor_names:
                return name
            aliases = (f"{other}{name[len(ours) :]}" for ours, other in NAME_ALIASES if name.startswith(ours))
            return next((alias for alias in aliases if alias in checkpoint_tensor_names), name)

        self.deltas = {checkpoint_name(n): v for n, v in self.deltas.items()}
        self.replaced = {checkpoint_name(n): v for n, v in self.replaced.items()}
        self.rows = {checkpoint_name(n): v for n, v in self.rows.items()}


def _tied_part(name: str) -> str | None:
    """Which end of the embeddings `name` is the weight of (however nested), if either."""
    return next(
        (part for suffix, part in TIED_TENSORS.items() if name == suffix or name.endswith(f".{suffix}")), None
    )


def load_lora_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors or .bin)."""
    root = Path(path).expanduser()
    config = read_adapter_config(root, str(path))
    settings = rank_settings(root, config)
    tensors = _read_adapter_tensors(root)
    pairs, replaced, token_rows, magnitudes = _pair_tensors(root, tensors)
    rows = {name: (_token_indices(root, config, name, values), values) for name, values in token_rows.items()}
    deltas: dict[str, LoraDelta] = {}
    for module, (a, b) in pairs.items():
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise ValueError(
                f"LoRA adapter {root}: {module} has lora_A rank {rank} but lora_B {list(b.shape)}"
            )
        expected, source = settings.expected_rank(module)
        if expected is not None and rank != expected:
            # PEFT refuses such an adapter; its scale would be computed from the other rank.
            raise ValueError(
                f"LoRA adapter {root}: {module} has rank {rank} but adapter_config.json says {source}"
            )
        magnitude = _dora_magnitude(root, config, module, magnitudes.pop(module, None), b.shape[0])
        deltas[f"{module}.weight"] = LoraDelta(a, b, settings.scale(module, rank), magnitude)
    if magnitudes:
        raise ValueError(
            f"LoRA adapter {root}: {next(iter(magnitudes))} has a DoRA magnitude but no lora_A/lora_B"
        )
    if not deltas and not replaced and not rows:
        raise ValueError(f"LoRA adapter {root} contains no lora_A/lora_B tensors")
    return LoraAdapter(root, deltas, replaced, rows)


def _dora_magnitude(
    root: Path, config: dict[str, Any], module: str, magnitude: torch.Tensor | None, out_features: int
) -> torch.Tensor | None:
    """DoRA's magnitude of `module`, checked against use_dora (PEFT writes both or neither)."""
    dora = config.get("use_dora") is True
    if magnitude is None and dora:
        raise ValueError(f"LoRA adapter {root}: use_dora is set but {module} has no lora_magnitude_vector")
    if magnitude is not None and not dora:
        raise ValueError(
            f"LoRA adapter {root}: {module} has a DoRA lora_magnitude_vector but use_dora is not set"
        )
    if magnitude is not None and tuple(magnitude.shape) != (out_features,):
        raise ValueError(
            f"LoRA adapter {root}: {module}'s lora_magnitude_vector is {list(magnitude.shape)}; "
            f"DoRA is supported on linear layers, whose magnitude is [{out_features}]"
        )
    return magnitude


def _token_indices(root: Path, config: dict[str, Any], name: str, values: torch.Tensor) -> torch.Tensor:
    """The rows of `name` (a weight) that trainable_token_indices trains: a list means the input
    embedding's, a dict maps module names (or their last parts) to lists."""
    module = name.removesuffix(".weight")
    given = config.get("trainable_token_indices")
    if isinstance(given, dict):
        given = next((v for k, v in given.items() if module == k or module.endswith(f".{k}")), None)
    if not isinstance(given, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in given):
        raise ValueError(
            f"LoRA adapter {root}: adapter_config.json's trainable_token_indices gives no list of token ids "
            f"for {module}, whose trained rows the adapter holds"
        )
    if values.dim() != 2 or values.shape[0] != len(given):
        raise ValueError(
            f"LoRA adapter {root}: {module} has {list(values.shape)} trained rows for "
            f"{len(given)} token ids in trainable_token_indices"
        )
    return torch.tensor(given, dtype=torch.int64)


def _read_adapter_tensors(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = root / "adapter_model.safetensors"
    if weights.is_file():
        return load_file(str(weights))
    pickled = root / "adapter_model.bin"
    if not pickled.is_file():
        raise ValueError(f"LoRA adapter {root} has no adapter_model.safetensors (or adapter_model.bin)")
    try:
        # weights_only: a pickle may run code; tensors in dicts are all an adapter holds.
        state = torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"LoRA adapter {root}: adapter_model.bin cannot be read ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"LoRA adapter {root}: adapter_model.bin does not hold a dict of tensors")
    return {str(key): tensor for key, tensor in state.items()}


def _pair_tensors(
    root: Path, tensors: dict[str, torch.Tensor]
) -> tuple[
    dict[str, tuple[torch.Tensor, torch.Tensor]],
    dict[str, torch.Tensor],
    dict[str, torch.Tensor],
    dict[str, torch.Tensor],
]:
    """({HF module name: (A, B)}, {HF tensor name: whole tensor}, {HF weight name: trained rows},
    {HF module name: DoRA magnitude}) from PEFT keys like base_model.model.<module>.lora_A.weight,
    <module>.lora_magnitude_vector, <module>.lora_embedding_A (kept
    transposed, so that B @ A is the embedding's [vocab, hidden] delta), <module>.base_layer.weight
    or .bias (the base layer's own tensor, saved for an adapted lm_head or a trained bias),
    <module>.weight (a module in modules_to_save) and
    <module>.token_adapter.trainable_tokens_delta (the new values of trainable_token_indices' rows)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        module, kind = _module_and_kind(name)
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(
                f"LoRA adapter {root}: tensor {key!r} is not named as PEFT saves adapters "
                f"({PEFT_PREFIX}<module>.lora_A.weight and the like)"
            )
        if kind is None:
            raise ValueError(
                f"LoRA adapter {root}: unsupported tensor {key!r} (only lora_A/lora_B weights of linear "
                "and embedding layers and whole module tensors are supported)"
            )
        if kind == "whole":
            replaced[module] = tensor.float()
        elif kind == "rows":
            rows[module] = tensor.float()
        elif kind == "magnitude":
            magnitudes[module] = tensor.float()
        elif kind in ("embedding_A", "embedding_B"):
            parts.setdefault(module, {})["B" if kind == "embedding_A" else "A"] = tensor.float().T
        else:
            parts.setdefault(module, {})[kind] = tensor.float()
    embeddings = [module for module in magnitudes if f"{PEFT_PREFIX}{module}.lora_embedding_A" in tensors]
    if embeddings:
        raise ValueError(f"LoRA adapter {root}: DoRA on an embedding ({embeddings[0]}) is not supported")
    incomplete = [module for module, ab in parts.items() if "A" not in ab or "B" not in ab]
    if incomplete:
        raise ValueError(f"LoRA adapter {root}: module {incomplete[0]} lacks its lora_A or lora_B tensor")
    return {module: (ab["A"], ab["B"]) for module, ab in parts.items()}, replaced, rows, magnitudes


def _module_and_kind(name: str) -> tuple[str, str | None]:
    """("model.layers.0.self_attn.q_proj", "A") for its lora_A weight, (tensor name, "whole") for a
    tensor replacing the checkpoint's; kind None for tensors of other methods (KaSA's lora_diag...)."""
    suffixes = (
        (".lora_A.weight", "A"),
        (".lora_B.weight", "B"),
        (".lora_embedding_A", "embedding_A"),
        (".lora_embedding_B", "embedding_B"),
        (".lora_magnitude_vector", "magnitude"),
    )
    for suffix, kind in suffixes:
        if name.endswith(suffix):
            return name.removesuffix(suffix), kind
    if name.endswith(".token_adapter.trainable_tokens_delta"):
        return f"{name.removesuffix('.token_adapter.trainable_tokens_delta')}.weight", "rows"
    if "lora_" in name or "token_adapter" in name:
        return name, None
    module, _, parameter = name.rpartition(".")
    if parameter not in ("weight", "bias"):
        return name, None
    return f"{module.removesuffix('.base_layer')}.{parameter}", "whole"


def merge_lora(
    weights: Iterable[tuple[str, torch.Tensor]], adapter: LoraAdapter
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the checkpoint tensors with the adapter's replacements, rows and deltas applied (in
    float32) where targeted."""
    for name, tensor in weights:
        delta, replacement = adapter.deltas.get(name), adapter.replaced.get(name)
        if delta is not None:
            expected = (delta.b.shape[0], delta.a.shape[1])
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"LoRA adapter {adapter.path} does not match the base model: {name} is "
                    f"{list(tensor.shape)} in the model but the adapter's B @ A is {list(expected)}"
                )
        if replacement is not None:
            if replacement.shape != tensor.shape:
                hint = " (a resized vocabulary is not supported)" if _tied_part(name) else ""
                raise ValueError(
                    f"LoRA adapter {adapter.path}: its own copy of {name} is {list(replacement.shape)} "
                    f"but the model's is {list(tensor.shape)}{hint}"
                )
            tensor = replacement
            adapter.merged.add(name)
        if name in adapter.rows:
            tensor = _with_rows(adapter, name, tensor, *adapter.rows[name])
        if delta is not None:
            tensor = delta.apply(tensor)
            adapter.merged.add(name)
        yield name, tensor
    missed = sorted(adapter.targets() - adapter.merged)
    if missed:
        raise ValueError(
            f"LoRA adapter {adapter.path}: the checkpoint has no tensor {missed[0]!r} to merge into"
        )


def _with_rows(
    adapter: LoraAdapter, name: str, tensor: torch.Tensor, index: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """`tensor` with the rows trainable_token_indices trained replaced (PEFT's index_copy)."""
    adapter.merged.add(name)
    if index.numel() == 0:
        return tensor
    rows, width = tensor.shape[0], tensor.shape[-1]
    if tensor.dim() != 2 or values.shape[1] != width or int(index.max()) >= rows or int(index.min()) < 0:
        raise ValueError(
            f"LoRA adapter {adapter.path} does not match the base model: {name} is {list(tensor.shape)} "
            f"but the adapter trains rows {index.tolist()[:8]} of width {values.shape[1]} "
            "(a resized vocabulary is not supported)"
        )
    return tensor.float().index_copy(0, index, values)
