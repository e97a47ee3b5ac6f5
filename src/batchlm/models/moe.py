"""Mixture-of-experts decoders: Qwen3-MoE and Mixtral. Llama-style decoder layers whose MLP is a
sparse expert block (router + fused experts) or, where the config says so, the dense one."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from torch import nn

from batchlm.layers.moe import DOWN, GATE, UP, SparseMoeBlock
from batchlm.layers.quantization.base import LoadedWeight
from batchlm.models.expert_weights import ExpertTensorRouter
from batchlm.models.hf_config import text_config_of
from batchlm.models.llama import BlockOptions, LlamaForCausalLM, LlamaModel
from batchlm.models.model_config import ModelConfig, read_model_config
from batchlm.models.moe_config import MoEConfig, MoEModelConfig, read_mixtral, read_qwen3_moe, with_moe
from batchlm.parallel.group import TensorParallelGroup


class MoEForCausalLM(LlamaForCausalLM):
    """A Llama-style causal LM whose MLPs are (mostly) expert blocks."""

    # Checkpoint name of each expert projection -> our part index.
    expert_part_names: ClassVar[dict[str, int]] = {"gate_proj": GATE, "up_proj": UP, "down_proj": DOWN}
    # Checkpoint name fragments renamed before loading (old -> ours).
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    # The router of the checkpoint being loaded (set by checkpoint_tensors).
    _experts: ExpertTensorRouter | None = None

    @classmethod
    def read_config(cls, hf_config: Any) -> ModelConfig:
        return with_moe(read_model_config(hf_config), cls.read_moe(text_config_of(hf_config)))

    def build_model(self, config: ModelConfig, tp: TensorParallelGroup) -> LlamaModel:
        if not isinstance(config, MoEModelConfig):
            raise TypeError(f"{type(self).__name__} is built from the config its read_config returns")
        moe = config.moe
        spec = moe.spec(config.hidden_size)

        def mlp_of_layer(index: int) -> nn.Module | None:
            return SparseMoeBlock(spec, tp) if moe.sparse_layers[index] else None

        return LlamaModel(config, self.block_options(config), tp, mlp_of_layer)

    @classmethod
    def read_moe(cls, hf_config: Any) -> MoEConfig:
        """The expert fields of this family's HF config."""
        raise NotImplementedError

    def checkpoint_tensors(
        self, weights: Iterable[tuple[str, LoadedWeight]]
    ) -> Iterable[tuple[str, LoadedWeight]]:
        """The tensors that are not experts'; the experts' load into the stacked parameters on the way."""
        self._experts = ExpertTensorRouter(self, self.expert_part_names)
        return self._experts.others(self._renamed(weights))

    def tensors_loaded_elsewhere(self) -> set[str]:
        assert self._experts is not None, "checkpoint_tensors comes first"
        return self._experts.stacked_names()

    def check_loaded_elsewhere(self) -> None:
        missing = self._experts.missing() if self._experts is not None else []
        if missing:
            shown = ", ".join(repr(name) for name in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise ValueError(f"missing tensor(s): the checkpoint lacks {shown}{more}")

    def _renamed(self, weights: Iterable[tuple[str, LoadedWeight]]) -> Iterable[tuple[str, LoadedWeight]]:
        for name, tensor in weights:
            yield self.renamed(name), tensor

    @classmethod
    def renamed(cls, name: str) -> str:
        """A checkpoint tensor's name as this family loads it (`checkpoint_renames` applied)."""
        for old, new in cls.checkpoint_renames:
            name = name.replace(old, new)
        return name


class Qwen3MoeForCausalLM(MoEForCausalLM):
    """Qwen3-MoE: Qwen3 attention (per-head q/k norms); dense MLPs in `mlp_only_layers` and between
    every `decoder_sparse_step`-th layer."""

    @classmethod
    def block_options(cls, config: ModelConfig) -> BlockOptions:
        return BlockOptions(qkv_bias=config.attention_bias, o_bias=config.attention_bias, qk_norm=True)

    @classmethod
    def read_moe(cls, hf_config: Any) -> MoEConfig:
        return read_qwen3_moe(hf_config)


class MixtralForCausalLM(MoEForCausalLM):
    """Mixtral: Mistral attention; every layer's MLP is `block_sparse_moe` with experts w1 (gate),
    w3 (up) and w2 (down), loaded under the names transformers gives them in memory."""

    expert_part_names: ClassVar[dict[str, int]] = {"w1": GATE, "w3": UP, "w2": DOWN}
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ((".block_sparse_moe.", ".mlp."),)

    @classmethod
    def read_moe(cls, hf_config: Any) -> MoEConfig:
        return read_mixtral(hf_config)
