"""Hand the C heap's free memory back to the system once loading is done.

Loading a model allocates and frees many temporaries (the raw blocks of each GGUF tensor, its codes
before packing, numpy intermediates); glibc keeps much of what was freed in the process's heap, where
it stays resident for the server's life. malloc_trim returns it. A no-op where the C library has no
malloc_trim (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable


def trim_heap() -> None:
    """Collect Python garbage, then release the heap's free pages (where glibc can)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function = library.malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim
