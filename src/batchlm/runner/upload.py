"""One host->device transfer per step: the step's small int arrays packed into a reused pinned buffer."""

from __future__ import annotations

import numpy as np
import torch

# Each array starts on a 16-byte boundary: every slice can be viewed as int64 or int32, and Triton,
# which compiles a kernel variant per pointer alignment (16 bytes or not), always sees aligned ones.
_ALIGN = 16
# Pinned/device buffer pairs used in turn: a buffer is rewritten two steps after its last upload, by
# which time that upload has long finished (its event is still checked before the rewrite).
_NUM_BUFFERS = 2


class StepUploader:
    """Copies a list of numpy arrays (int32 / int64) to the device in a single transfer.

    CPU: zero-copy tensor views of the arrays. CUDA: the arrays are written straight into a pinned
    staging buffer, copied with one non-blocking memcpy into a device buffer, and returned as typed
    views of it (no per-array copies or casts on the device). The device buffers are reused: a later
    step's copy is queued on the same stream after every kernel of the earlier step that reads it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._host: list[torch.Tensor | None] = [None] * _NUM_BUFFERS
        self._device: list[torch.Tensor | None] = [None] * _NUM_BUFFERS
        self._copied: list[torch.cuda.Event | None] = [None] * _NUM_BUFFERS
        self._turn = 0

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        if self.device.type != "cuda":
            return [torch.from_numpy(array) for array in arrays]
        offsets, total = _layout(arrays)
        turn, self._turn = self._turn, (self._turn + 1) % _NUM_BUFFERS
        host, device_buffer = self._buffers(turn, total)
        host_bytes = host.numpy()
        for array, offset in zip(arrays, offsets, strict=True):
            host_bytes[offset : offset + array.nbytes].view(array.dtype)[:] = array.ravel()
        device_buffer[:total].copy_(host[:total], non_blocking=True)
        event = self._copied[turn] = torch.cuda.Event()
        event.record()
        return [
            device_buffer[offset : offset + array.nbytes].view(_TORCH_DTYPES[array.dtype]).view(array.shape)
            for array, offset in zip(arrays, offsets, strict=True)
        ]

    def _buffers(self, turn: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The turn's buffers, at least `total` bytes, once their previous upload has finished."""
        event = self._copied[turn]
        if event is not None:
            event.synchronize()
        host, device_buffer = self._host[turn], self._device[turn]
        if host is None or device_buffer is None or host.numel() < total:
            capacity = max(total, 2 * (host.numel() if host is not None else 0), 1 << 16)
            host = self._host[turn] = torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
            device_buffer = self._device[turn] = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        return host, device_buffer


_TORCH_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}


def _layout(arrays: list[np.ndarray]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for array in arrays:
        if array.dtype not in _TORCH_DTYPES:
            raise TypeError(f"step inputs must be int32 or int64 arrays, got {array.dtype}")
        offsets.append(total)
        total += -(-array.nbytes // _ALIGN) * _ALIGN
    return offsets, total
