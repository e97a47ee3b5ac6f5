"""Apply one step's grammar bitmasks to the logits of its constrained rows, in one batched op."""

from __future__ import annotations

import functools

import numpy as np
import torch

from batchlm.structured.step_masks import GrammarMasks

_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}
# Pinned buffers in the ring: a buffer is written again only after the uploads of the steps between
# have been queued, and its last upload is waited for first.
STAGING_SLOTS = 4


class BitmaskStaging:
    """A ring of pinned host buffers for bitmasks on their way to the device.

    Pinning a fresh buffer per step costs the host more than computing the masks; so the matchers
    write straight into a buffer from here (`buffer`), and `upload` sends it without another copy.
    A bitmask that lives elsewhere is copied into the next buffer first."""

    def __init__(self, device: torch.device, words: int) -> None:
        self.device = device
        self.words = words
        self._rows = 0
        self._buffers: list[torch.Tensor] = []  # [rows, words] int32, pinned
        self._uploaded: list[torch.cuda.Event | None] = []
        self._next = 0

    def buffer(self, rows: int) -> np.ndarray:
        """The next free buffer's first `rows` rows, as a numpy array to fill."""
        if rows > self._rows:
            self._grow(rows)
        slot = self._next
        self._next = (slot + 1) % STAGING_SLOTS
        event = self._uploaded[slot]
        if event is not None:
            event.synchronize()  # its last upload (STAGING_SLOTS steps ago) has long finished
            self._uploaded[slot] = None
        return self._buffers[slot][:rows].numpy()

    def upload(self, bitmask: np.ndarray, in_place: bool = False) -> torch.Tensor:
        """bitmask [R, words] int32 -> the same on the device, queued without blocking the host.
        in_place: the bitmask is not written yet, so it must be one of the ring's buffers (no copy)."""
        rows = bitmask.shape[0]
        slot = self._slot_of(bitmask)
        if slot is None:
            if in_place:
                raise RuntimeError("masks still being written must be in the pinned ring to be uploaded")
            staged = self.buffer(rows)
            np.copyto(staged, bitmask)
            slot = self._slot_of(staged)
            assert slot is not None
        words = self._buffers[slot][:rows].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._uploaded[slot] = event
        return words

    def _slot_of(self, bitmask: np.ndarray) -> int | None:
        address = bitmask.ctypes.data
        for slot, staged in enumerate(self._buffers):
            if staged.data_ptr() == address and bitmask.flags["C_CONTIGUOUS"]:
                return slot
        return None

    def _grow(self, rows: int) -> None:
        for event in self._uploaded:
            if event is not None:
                event.synchronize()
        self._rows = max(rows, 2 * self._rows)
        shape = (self._rows, self.words)
        self._buffers = [torch.empty(shape, dtype=torch.int32, pin_memory=True) for _ in range(STAGING_SLOTS)]
        self._uploaded = [None] * STAGING_SLOTS
        self._next = 0


def forbidden_on_host(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """[rows, words] int32 bitmask -> [rows, vocab_size] bool, True where the token is forbidden."""
    bits = np.unpackbits(np.invert(bitmask).view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab_size].view(np.bool_)


def forbidden_on_device(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed words [R, W] int32 already on the device -> [R, vocab_size] bool, unpacked there."""
    shifts = _BIT_SHIFTS.get(words.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[words.device] = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    return bits.flatten(1)[:, :vocab_size] == 0  # [R, V]


def apply_grammar_masks(
    logits: torch.Tensor, masks: GrammarMasks, staging: BitmaskStaging | None = None
) -> None:
    """Set forbidden tokens of the constrained rows to -inf, in place. logits: [B, V], of a dtype
    `masks_in_place` accepts. Other rows are not written at all, so their logits stay bit-identical.
    staging: the device's pinned ring (one is made for the call when None)."""
    assert masks_in_place(logits), f"{logits.dtype} logits on {logits.device} take no masks in place"
    vocab_size = logits.shape[1]
    if logits.device.type == "cpu":
        assert not masks.written_later, "a CPU engine reads its masks once they are written"
        # numpy's single pass per row: torch's masked_fill on the CPU spends more in threading than work.
        forbidden = forbidden_on_host(masks.bitmask, vocab_size)
        values = logits.numpy()
        for index, row in enumerate(masks.rows):
            np.putmask(values[row], forbidden[index], -np.inf)
        return
    if staging is None:
        staging = BitmaskStaging(logits.device, masks.bitmask.shape[1])
    words = staging.upload(masks.bitmask, in_place=masks.written_later)  # [R, W] int32 on the device
    all_rows = len(masks.rows) == logits.shape[0]
    rows = None if all_rows else _rows_on_device(masks.rows, logits.device)
    if _bitmask_kernel_fits(logits):
        from batchlm.kernels.grammar_bitmask import apply_bitmask

        apply_bitmask(logits, words, rows)
        return
    forbidden_rows = forbidden_on_device(words, vocab_size)  # [R, V]
    if rows is None:
        logits.masked_fill_(forbidden_rows, float("-inf"))
        return
    constrained = logits.index_select(0, rows).masked_fill_(forbidden_rows, float("-inf"))  # [R, V]
    logits.index_copy_(0, rows, constrained)


def masks_in_place(logits: torch.Tensor) -> bool:
    """Whether `apply_grammar_masks` takes logits of this dtype on this device: float32 on the CPU
    (numpy has no bfloat16), the floating dtypes the mask kernel writes on an accelerator."""
    if logits.device.type == "cpu":
        return logits.dtype == torch.float32
    return logits.dtype in (torch.float32, torch.bfloat16, torch.float16)


def warm_up_grammar_masks(logits: torch.Tensor) -> None:
    """Compile the device's mask kernel, if it has one, for the model's logits and for float32 ones.
    logits: [1, vocab] as the model makes them."""
    if logits.device.type != "cuda":
        return
    for dtype in {logits.dtype, torch.float32}:
        widened = logits.to(dtype)
        if _bitmask_kernel_fits(widened):
            from batchlm.kernels.grammar_bitmask import warm_up

            warm_up(widened)


def _rows_on_device(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).pin_memory().to(device, non_blocking=True)


def _bitmask_kernel_fits(logits: torch.Tensor) -> bool:
    """The Triton kernel (one launch, allowed logits untouched) applies when Triton is there."""
    return logits.stride(1) == 1 and _has_triton()


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the install
        return False
    return True
