"""Apply one step's grammar bitmasks to the logits of its constrained rows, in one batched op."""

from __future__ import annotations

import numpy as np
import torch

from batchlm.structured.sequences import GrammarMasks

_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def forbidden_on_host(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """[rows, words] int32 bitmask -> [rows, vocab_size] bool, True where the token is forbidden."""
    bits = np.unpackbits(np.invert(bitmask).view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab_size].view(np.bool_)


def forbidden_on_device(bitmask: np.ndarray, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The same on the device: the packed words are uploaded (1/32 of the bytes) and unpacked there."""
    staged = torch.from_numpy(bitmask).pin_memory()  # a fresh pinned buffer per step: no reuse race
    words = staged.to(device, non_blocking=True)  # [R, W]
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    return bits.flatten(1)[:, :vocab_size] == 0  # [R, V]


def apply_grammar_masks(logits: torch.Tensor, masks: GrammarMasks) -> None:
    """Set forbidden tokens of the constrained rows to -inf, in place. logits: [B, V] float32.
    Other rows are not written at all, so their logits stay bit-identical."""
    vocab_size = logits.shape[1]
    if logits.device.type == "cpu":
        # numpy's single pass per row: torch's masked_fill on the CPU spends more in threading than work.
        forbidden = forbidden_on_host(masks.bitmask, vocab_size)
        values = logits.numpy()
        for index, row in enumerate(masks.rows):
            np.putmask(values[row], forbidden[index], -np.inf)
        return
    forbidden_rows = forbidden_on_device(masks.bitmask, vocab_size, logits.device)  # [R, V]
    if len(masks.rows) == logits.shape[0]:
        logits.masked_fill_(forbidden_rows, float("-inf"))
        return
    rows = torch.tensor(masks.rows, dtype=torch.int64).pin_memory().to(logits.device, non_blocking=True)
    constrained = logits.index_select(0, rows).masked_fill_(forbidden_rows, float("-inf"))  # [R, V]
    logits.index_copy_(0, rows, constrained)
