"""Run the quantized CPU kernels on a chosen path for a while (tests compare the paths)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from batchlm.kernels import cpu_quant


def _choose(name: str | None) -> None:
    if name is None:
        os.environ.pop(cpu_quant.ISA_ENV, None)
    else:
        os.environ[cpu_quant.ISA_ENV] = name
    cpu_quant.use_avx512.cache_clear()
    cpu_quant.use_amx.cache_clear()


@contextmanager
def kernel_path(name: str) -> Iterator[None]:
    """The kernels on path `name` ("auto": the CPU's best, AMX tiles included; "avx512": AVX-512 VNNI
    without tiles; "avx2") inside the block, as the environment had them after it."""
    saved = os.environ.get(cpu_quant.ISA_ENV)
    _choose(name)
    try:
        yield
    finally:
        _choose(saved)
