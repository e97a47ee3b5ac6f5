"""Programmatic dependent launch (Hopper and later) for the decode step.

A single sequence's decode step is ~160 small kernels, each of which pays a ramp: its programs start
only once the kernel before it has finished, and then wait on their first reads. A kernel launched
with PDL may start while the kernel before it is still running, once every program of that kernel
has signalled (`griddepcontrol.launch_dependents`). Its programs then issue the reads that do not
depend on that kernel (a linear's weight tiles) and wait for it (`griddepcontrol.wait`: the kernel
before has completed and its writes are visible) before they read its output or write anything.

Our decode-path kernels take a PDL flag: with it they signal at their start, so the next kernel's
programs are resident by the time they finish, and wait before touching activations. Rules that keep
this safe, for every kernel launched with PDL:
- nothing it reads from an earlier kernel, and nothing it writes, comes before the wait;
- only memory no kernel writes while serving (weights, scales) is read before it. The one
  exception is the decode attention: its lengths and block ids come from the host's copies of the
  step's inputs, which order every step fully after the one before; the step's own KV write may
  change any row of the tile it reads early (each request's newest token, and a verify chunk's
  earlier tokens in the rows after them), so it reads that whole tile again after the wait.
A kernel's wait returns once the kernel before it has completed, which itself waited for the one
before, so the order of the whole stream holds. A signal has no effect on a following kernel
launched without PDL (torch's and cuBLAS's). Both instructions need sm_90; elsewhere (and in
Triton's CPU interpreter) the flag is off and the kernels compile without them.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    TRITON_HAS_PDL = True
except ImportError:  # Triton before 3.3: the flag stays off, so these are never compiled in
    TRITON_HAS_PDL = False

    @triton.jit
    def gdc_launch_dependents() -> None:
        pass

    @triton.jit
    def gdc_wait() -> None:
        pass


# Set to 0 to launch every kernel plainly (a driver or tool that mishandles PDL in CUDA graphs).
ENV_FLAG = "BATCHLM_PDL"


@functools.lru_cache(maxsize=16)
def _capable(index: int) -> bool:
    """An NVIDIA GPU of compute capability 9.0 or later (ROCm reports its own numbers here)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with PDL and compiled with its instructions."""
    if device.type != "cuda" or not TRITON_HAS_PDL or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get(ENV_FLAG, "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """Keyword arguments of a launch on `device`: the kernel's PDL flag, and the launch option."""
    if pdl_enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def let_next_kernel_start(PDL: tl.constexpr):
    """Signal that the next kernel may start (its programs then wait for this one to finish)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """Block until the kernel before has completed and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """A kernel with nothing to read early: let the next one start, then wait for the one before."""
    let_next_kernel_start(PDL)
    wait_for_previous_kernel(PDL)
