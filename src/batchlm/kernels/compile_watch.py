"""Report Triton JIT compiles that happen after start-up.

Every kernel variant serving needs should be compiled while the engine starts (profile run, CUDA-graph
captures). One compiled later stalls the step that met it for up to a second or more, with every
request in the batch waiting, so each is logged and counted.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_compiles_after_startup = 0
_installed = False


def watch_compiles_after_startup() -> bool:
    """Log and count each Triton compile (or disk-cache load) from now on. False when this Triton
    has no compile hook (older releases); calling it again is harmless."""
    global _installed
    try:
        from triton import knobs
    except ImportError:
        return False
    with _lock:
        if _installed:
            return True
        previous = knobs.runtime.jit_post_compile_hook

        def on_compile(**kwargs: Any) -> Any:
            global _compiles_after_startup
            with _lock:
                _compiles_after_startup += 1
            info = kwargs.get("fn")
            name = getattr(info, "name", "a kernel")
            logger.info(
                "Triton compiled %s after start-up (a kernel variant the warm-up did not reach)", name
            )
            return previous(**kwargs) if previous is not None else None

        knobs.runtime.jit_post_compile_hook = on_compile
        _installed = True
    return True


def compiles_after_startup() -> int:
    """How many Triton kernels were compiled or loaded since watch_compiles_after_startup()."""
    return _compiles_after_startup
