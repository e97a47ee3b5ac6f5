"""Keep Triton from compiling a new kernel variant for launch arguments that change from step to step.

Triton specialises a kernel on each integer argument (== 1, divisible by 16) and on each pointer's
16-byte alignment. For values that vary while serving (a block-table row stride, metadata tensors
sliced at the number of decode rows) every new combination would be a JIT compile of a second or so
in the middle of a step, so kernels list those arguments here.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import triton

# Older Triton releases have only do_not_specialize, which then also covers pointer alignment.
_HAS_ALIGNMENT_OPTION = "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters


def unspecialized(ints: Sequence[str] = (), pointers: Sequence[str] = ()) -> dict[str, Any]:
    """triton.jit keyword arguments that leave `ints` unspecialised and `pointers` unaligned."""
    if _HAS_ALIGNMENT_OPTION:
        return {"do_not_specialize": list(ints), "do_not_specialize_on_alignment": list(pointers)}
    return {"do_not_specialize": [*ints, *pointers]}
