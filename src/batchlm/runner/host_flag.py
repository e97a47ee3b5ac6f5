"""A counter in pinned host memory that a CUDA stream can wait for: work queued after `wait_on_device(n)`
runs once a host thread has called `release(n)` (or a later value), with no host thread waiting. The
grammar masks use it: the engine thread queues a step's mask upload and sampling at once, and the mask
worker releases them when the masks are written."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Protocol

import numpy as np
import torch

logger = logging.getLogger(__name__)

# cuStreamWaitValue32's flag: wait until (int32)(*address - value) >= 0, so the counter may wrap.
_WAIT_VALUE_GEQ = 0
# BATCHLM_MASKS_DEVICE_WAIT=0 keeps the engine thread waiting for each step's masks itself (A/B runs).
DEVICE_WAIT_ENV = "BATCHLM_MASKS_DEVICE_WAIT"


class StreamFlag(Protocol):
    """What StepMasks needs of a flag: queue a wait on the device's stream, release it from any thread."""

    # True when wait_on_device returns only once released (what follows it may read the masks).
    waits_on_host: bool

    def wait_on_device(self, ticket: int) -> None: ...

    def release(self, ticket: int) -> None: ...


class HostFlag:
    """The CUDA form: a pinned 32-bit word, waited for by the stream's front end (no kernel runs)."""

    waits_on_host = False

    def __init__(self, device: torch.device, driver: ctypes.CDLL) -> None:
        self.device = device
        self._word = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self._view = self._word.numpy().view(np.uint32)
        self._fence = threading.Lock()
        self._wait = driver.cuStreamWaitValue32_v2
        self._wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        self._wait.restype = ctypes.c_int
        self._address = device_address(driver, self._word)

    def wait_on_device(self, ticket: int) -> None:
        """Queue, on the current stream, a wait until the word reaches `ticket`."""
        stream = torch.cuda.current_stream(self.device).cuda_stream
        _check(self._wait(stream, self._address, ticket & 0xFFFFFFFF, _WAIT_VALUE_GEQ), "cuStreamWaitValue32")

    def release(self, ticket: int) -> None:
        """Let the device pass every wait for `ticket` or an earlier one, once the caller's writes
        before this call (the masks) are visible: taking and dropping a lock is a full memory barrier,
        which weakly ordered hosts (arm64) need before the word's store."""
        with self._fence:
            pass
        self._view[0] = ticket & 0xFFFFFFFF


def device_address(driver: ctypes.CDLL, word: torch.Tensor) -> int:
    """The device's address of page-locked, mapped host memory."""
    address = ctypes.c_uint64()
    get_pointer = driver.cuMemHostGetDevicePointer_v2
    get_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    _check(get_pointer(ctypes.byref(address), word.data_ptr(), 0), "cuMemHostGetDevicePointer")
    return address.value


class ThreadFlag:
    """The same contract on the host: `wait_on_device` blocks the calling thread until released (tests
    run the masks' device-wait path with it on any machine)."""

    waits_on_host = True

    def __init__(self) -> None:
        self._value = 0
        self._changed = threading.Condition()

    @property
    def value(self) -> int:
        """The latest ticket released."""
        return self._value

    def wait_on_device(self, ticket: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._value >= ticket)

    def release(self, ticket: int) -> None:
        with self._changed:
            self._value = max(self._value, ticket)
            self._changed.notify_all()


def _check(result: int, call: str) -> None:
    if result != 0:
        raise RuntimeError(f"{call} failed with CUresult {result}")


def stream_flag(device: torch.device) -> HostFlag | None:
    """A HostFlag for a CUDA device, or None (another device, BATCHLM_MASKS_DEVICE_WAIT=0, or a driver
    without 32-bit stream waits): the engine thread then waits for each step's masks itself."""
    if device.type != "cuda" or os.environ.get(DEVICE_WAIT_ENV, "1") == "0":
        return None
    try:
        flag = HostFlag(device, ctypes.CDLL("libcuda.so.1"))
        # A wait for what is already there returns at once: a probe that the driver takes the call.
        flag.wait_on_device(0)
    except (OSError, AttributeError, RuntimeError) as exc:
        logger.info("grammar masks: the engine thread waits for them itself (%s)", exc)
        return None
    return flag
