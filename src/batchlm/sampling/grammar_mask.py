"""Apply one step's grammar bitmasks to the logits of its constrained rows, in one batched op."""

from __future__ import annotations

import numpy as np
import torch

from batchlm.structured.sequences import GrammarMasks

_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def allowed_on_device(bitmask: np.ndarray, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[rows, words] int32 bitmask -> [rows, vocab_size] bool, True where the token is allowed."""
    if device.type == "cpu":
        unpacked = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
        return torch.from_numpy(unpacked).bool()
    staged = torch.from_numpy(bitmask).pin_memory()  # a fresh pinned buffer per step: no reuse race
    words = staged.to(device, non_blocking=True)  # [R, W]
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    return bits.flatten(1)[:, :vocab_size].bool()


def apply_grammar_masks(logits: torch.Tensor, masks: GrammarMasks) -> None:
    """Set disallowed tokens of the constrained rows to -inf, in place. logits: [B, V] float32.
    Other rows are not written at all, so their logits stay bit-identical."""
    vocab_size = logits.shape[1]
    allowed = allowed_on_device(masks.bitmask, vocab_size, logits.device)  # [R, V]
    if len(masks.rows) == logits.shape[0]:
        logits.masked_fill_(~allowed, float("-inf"))
        return
    rows = torch.tensor(masks.rows, dtype=torch.int64)
    if logits.device.type != "cpu":
        rows = rows.pin_memory().to(logits.device, non_blocking=True)
    constrained = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))  # [R, V]
    logits.index_copy_(0, rows, constrained)
