"""The CPU kernel libraries a CPU engine loads, built together before the model loads."""

from __future__ import annotations

from batchlm.kernels.cpu_decode_stack import STACK_KERNELS
from batchlm.kernels.cpu_native import KERNELS, build_libraries
from batchlm.kernels.cpu_quant import QUANT_KERNELS


def build_cpu_kernels() -> None:
    """On a machine's first start, compile every kernel library at once (about a second each,
    otherwise in turn as loading reaches them); later starts find them in the cache."""
    build_libraries([KERNELS, QUANT_KERNELS, STACK_KERNELS])
