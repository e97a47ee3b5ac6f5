"""Rotary position embedding (NeoX/HF "rotate half" layout) from a cos/sin cache indexed by position."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from batchlm.kernels.cpu_rope import rotate_native
from batchlm.kernels.dispatch import fused_ops_for
from batchlm.layers.rope_scaling import (
    dynamic_ntk_inv_freq,
    inv_freq_and_scaling,
    longrope_inv_freq,
    read_rope_parameters,
)


@dataclass(frozen=True)
class RopeSpec:
    """The rotary embedding one layer uses (layers with equal specs share one table)."""

    # Flat RoPE parameters as read_rope_parameters returns them (rope_type, rope_theta, scaling fields).
    params: dict[str, Any] = field(hash=False)
    # Leading dimensions of each head that rotate; the rest pass through (partial rotary, Phi-3).
    rotary_dim: int
    # config.max_position_embeddings (dynamic NTK scaling grows from it).
    config_max_position: int


@dataclass(frozen=True)
class LongRopeSwitch:
    """Phi-3's LongRoPE as transformers applies it: a sequence of more than `after` tokens rotates
    every position with the long factors (transformers recomputes the cache when a sequence first
    grows past that length), a shorter one with the short factors. The long rotation's rows follow
    the others in the cos/sin table: a long sequence's token rotates by row position + table_offset."""

    after: int
    table_offset: int


class RotaryEmbedding(nn.Module):
    """Rotates the first rotary_dim dimensions of queries and keys by their positions; shared by
    every layer with the same RopeSpec."""

    def __init__(
        self, head_dim: int, cos_sin_cache: torch.Tensor, long_switch: LongRopeSwitch | None = None
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        # [rows, rotary_dim]: cos in the first half of each row, sin in the second. One row a position,
        # then (with a long_switch) the long rotation's rows.
        self.rotary_dim = cos_sin_cache.shape[-1]
        self.register_buffer("cos_sin_cache", cos_sin_cache, persistent=False)
        self.cos_sin_cache: torch.Tensor
        self.long_switch = long_switch

    def follow_switch(self, switch: LongRopeSwitch) -> None:
        """Take another layer's LongRoPE switch (a model with LongRoPE on some layers only): the
        positions of long sequences come offset for every layer, so this table repeats after it."""
        if self.cos_sin_cache.shape[0] != switch.table_offset:
            raise ValueError(f"a {self.cos_sin_cache.shape[0]}-row RoPE table cannot follow {switch}")
        self.cos_sin_cache = torch.cat((self.cos_sin_cache, self.cos_sin_cache))
        self.long_switch = switch

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; query: [T, H, D]; key: [T, H_kv, D] -> same shapes, rotated
        if self.rotary_dim < self.head_dim:
            return self._rotate_leading(positions, query, key)
        fused = fused_ops_for(query)
        if fused is not None:
            # GPU: one in-place kernel over q and k (adjacent in the fused qkv output) or one each.
            both = _adjacent_heads(query, key)
            for heads in (both,) if both is not None else (query, key):
                fused.rotary_embedding_(positions, heads, self.cos_sin_cache)
            return query, key
        both = _adjacent_heads(query, key)
        native = _rotate_native(both, query, key, self.cos_sin_cache, positions)
        if native is not None:  # x86-64 CPUs: the same values in one pass
            return native
        cos, sin = self.cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2]
        if both is None:
            return _rotate(query, cos, sin), _rotate(key, cos, sin)
        # q and k are neighbours in the fused qkv output: rotate them with one set of ops.
        rotated = _rotate(both, cos, sin)  # [T, H + H_kv, D]
        return rotated[:, : query.shape[1]], rotated[:, query.shape[1] :]

    def rotate(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward(), as the attention backends call it (attention/backend.QueryKeyRotation)."""
        return self.forward(positions, query, key)

    def fusable_table(self, query: torch.Tensor) -> torch.Tensor | None:
        """The cos | sin table when a GPU kernel may rotate these queries and their keys as the
        in-place kernel does (every dimension turns); else None."""
        if self.rotary_dim < self.head_dim:
            return None
        return self.cos_sin_cache if fused_ops_for(query) is not None else None

    def _rotate_leading(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Partial rotary: only the first rotary_dim dimensions turn, the rest are kept as they are.
        cos, sin = self.cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
        dim = self.rotary_dim
        rotated = [torch.cat((_rotate(x[..., :dim], cos, sin), x[..., dim:]), dim=-1) for x in (query, key)]
        return rotated[0], rotated[1]


def _adjacent_heads(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """[T, H + H_kv, D] view over query and key when key's heads directly follow query's in
    memory with the same strides (the split of a fused qkv projection); otherwise None."""
    if query.untyped_storage().data_ptr() != key.untyped_storage().data_ptr():
        return None
    # A single token's views may differ in their row stride (view() picks any for a dimension of
    # size 1), which no row step ever uses.
    same_rows = query.shape[0] == 1 or query.stride(0) == key.stride(0)
    if query.dtype != key.dtype or not same_rows or query.stride()[1:] != key.stride()[1:]:
        return None
    if query.stride(2) != 1:
        return None
    if query.stride(1) != query.shape[2] or query.shape[0] != key.shape[0]:
        return None
    if key.data_ptr() != query.data_ptr() + query.shape[1] * query.stride(1) * query.element_size():
        return None
    heads = query.shape[1] + key.shape[1]
    return query.as_strided((query.shape[0], heads, query.shape[2]), query.stride())


def _rotate_native(
    both: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """query and key rotated by the CPU kernel (both at once when adjacent); None where it does not
    take them."""
    if query.device.type != "cpu":
        return None
    if both is not None:
        rotated = rotate_native(both, table, positions)
        return None if rotated is None else (rotated[:, : query.shape[1]], rotated[:, query.shape[1] :])
    rotated_query = rotate_native(query, table, positions)
    rotated_key = rotate_native(key, table, positions) if rotated_query is not None else None
    return None if rotated_query is None or rotated_key is None else (rotated_query, rotated_key)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; the pair (x1[i], x2[i]) of the two halves is rotated by angle i. Written into
    # the two halves of one output (no cat); the same products and sums as HF's rotate_half form,
    # so results are bit-identical to transformers.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=out1).sub_(x2 * sin)
    torch.mul(x2, cos, out=out2).add_(x1 * sin)
    return out


def build_cos_sin_cache(
    params: dict[str, Any], head_dim: int, max_position: int, config_max_position: int
) -> torch.Tensor:
    """[max_position, head_dim] float32 cache for the RoPE parameters `params` (head_dim here is the
    rotating width)."""
    positions = torch.arange(max_position, dtype=torch.float32)
    if params["rope_type"] == "dynamic":
        inv_freq = dynamic_ntk_inv_freq(params, head_dim, config_max_position, positions)  # [P, D/2]
        angles = positions.unsqueeze(-1) * inv_freq
        scaling = 1.0
    else:
        inv_freq, scaling = inv_freq_and_scaling(params, head_dim)  # [D/2]
        angles = torch.outer(positions, inv_freq)
        if params["rope_type"] == "longrope":
            # Past the pretraining length the long factors take over, position by position. The
            # engine rotates a sequence that long with the long rows throughout (build_rope).
            original = int(params["original_max_position_embeddings"])
            long_freq = longrope_inv_freq(params, head_dim, "long_factor")
            angles[original:] = torch.outer(positions[original:], long_freq)
    return torch.cat((angles.cos() * scaling, angles.sin() * scaling), dim=-1)


def build_rope(spec: RopeSpec, head_dim: int, max_position: int) -> RotaryEmbedding:
    """The rotary embedding for `spec`, with a cache covering positions < max_position (twice over for
    LongRoPE past its original length: the rows of sequences that grew past it follow)."""
    params, switch = spec.params, None
    # The cache is computed on the CPU (deterministic, float32), then moved to the default device.
    with torch.device("cpu"):
        cache = build_cos_sin_cache(params, spec.rotary_dim, max_position, spec.config_max_position)
        original = params.get("original_max_position_embeddings")
        if params["rope_type"] == "longrope" and original and max_position > int(original):
            # The long rows: the same LongRoPE with its long factors in place of the short ones.
            long_params = {**params, "short_factor": params["long_factor"]}
            long_rows = build_cos_sin_cache(
                long_params, spec.rotary_dim, max_position, spec.config_max_position
            )
            cache = torch.cat((cache, long_rows))
            switch = LongRopeSwitch(after=int(original), table_offset=max_position)
    return RotaryEmbedding(head_dim, cache.to(torch.get_default_device()), switch)


def get_rope(config: Any, head_dim: int, max_position: int) -> RotaryEmbedding:
    """The rotary embedding an HF config asks for, with a cache covering positions < max_position."""
    spec = RopeSpec(read_rope_parameters(config), head_dim, int(config.max_position_embeddings))
    return build_rope(spec, head_dim, max_position)


def long_rope_switch(model: nn.Module, max_model_len: int) -> LongRopeSwitch | None:
    """The model's LongRoPE switch (every layer's is the same), or None when it has one rotation or
    no sequence of `max_model_len` tokens can reach the switch."""
    switches = {module.long_switch for module in model.modules() if isinstance(module, RotaryEmbedding)}
    switches.discard(None)
    if len(switches) > 1:
        raise ValueError(f"layers disagree on LongRoPE's original length: {sorted(map(str, switches))}")
    switch = switches.pop() if switches else None
    return switch if switch is not None and max_model_len > switch.after else None


def shared_ropes(specs: list[RopeSpec], head_dim: int, max_position: int) -> list[RotaryEmbedding]:
    """One rotary embedding per layer; layers with equal specs share one (one table per RoPE base)."""
    built: list[tuple[RopeSpec, RotaryEmbedding]] = []
    ropes = []
    for spec in specs:
        found = next((rope for known, rope in built if known == spec), None)
        if found is None:
            found = build_rope(spec, head_dim, max_position)
            built.append((spec, found))
        ropes.append(found)
    switches = {rope.long_switch for _, rope in built if rope.long_switch is not None}
    if len(switches) == 1:
        switch = switches.pop()
        for _, rope in built:
            if rope.long_switch is None:
                rope.follow_switch(switch)
    return ropes
