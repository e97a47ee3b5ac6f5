"""Compile the Triton kernels start-up needs on several threads instead of one after another.

A cold start (empty Triton cache, as on a fresh machine) spends seconds in JIT compiles: each kernel
variant the profile run and the warm-up meet compiles when first launched, serially. Here those
passes run once as a dry pass in which a kernel that is not compiled yet is neither compiled nor
launched, only noted (Triton's `jit_cache_hook`); the noted variants are then compiled together on
a thread pool (Triton's AsyncCompileMode; ptxas and the C compiler that builds each launcher run as
subprocesses), and the real passes find them compiled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from batchlm.config import positive_int_from_env

logger = logging.getLogger(__name__)

# Compiles are short and partly single-threaded inside LLVM; more threads than this stop paying.
MAX_COMPILE_THREADS = 8


@dataclass
class DeferredCompiles:
    """Kernel variants a dry pass met uncompiled: (JITFunction, Triton's specialization JSON)."""

    variants: dict[tuple[int, str], tuple[Any, str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.variants)


COMPILE_THREADS_ENV = "BATCHLM_COMPILE_THREADS"


def compile_threads(environ: dict[str, str] | None = None) -> int:
    """Threads for start-up compiles: BATCHLM_COMPILE_THREADS (1 = one after another), else
    min(cores, 8). Raises ValueError naming the variable for a value that is not a positive integer."""
    configured = positive_int_from_env(COMPILE_THREADS_ENV, environ)
    if configured is not None:
        return configured
    return max(1, min(os.cpu_count() or 1, MAX_COMPILE_THREADS))


def _async_compile_mode() -> Any | None:
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # Triton before 3.4: no async compiles; the real passes compile serially
        return None
    return AsyncCompileMode


@contextmanager
def defer_compiles() -> Iterator[DeferredCompiles | None]:
    """Within: a Triton launch whose variant is not compiled yet records the variant and does
    nothing else (no compile, no launch: its outputs hold garbage). Yields None, and changes nothing,
    where this Triton cannot defer compiles."""
    try:
        from triton import knobs
    except ImportError:
        yield None
        return
    if _async_compile_mode() is None or not hasattr(knobs.runtime, "jit_cache_hook"):
        yield None
        return
    deferred = DeferredCompiles()
    previous = knobs.runtime.jit_cache_hook

    def note(*, fn: Any, compile: dict[str, Any], **_: Any) -> bool:
        kernel, specialization = fn.jit_function, compile["specialization_data"]
        deferred.variants.setdefault((id(kernel), specialization), (kernel, specialization))
        return True  # tells Triton to skip this launch

    knobs.runtime.jit_cache_hook = note
    try:
        yield deferred
    finally:
        knobs.runtime.jit_cache_hook = previous


def compile_deferred(deferred: DeferredCompiles, threads: int) -> None:
    """Compile every deferred variant, `threads` at a time, into Triton's in-memory and disk caches."""
    mode = _async_compile_mode()
    if not deferred or mode is None:
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="batchlm-compile") as pool:
        with mode(pool):
            compiling = [
                kernel.preload(specialization) for kernel, specialization in deferred.variants.values()
            ]
        # Leaving the mode waited for every compile. Each kernel's first launch also builds its
        # launcher (a small C module, through the system compiler); build them here too, together.
        for building in [pool.submit(_build_launcher, future.result()) for future in compiling]:
            building.result()


def _build_launcher(kernel: Any) -> None:
    """Build (into Triton's disk cache) the launcher the kernel's first launch would build. Best
    effort: it uses Triton internals, and on any failure the first launch builds it as before."""
    try:
        from triton.runtime.driver import driver

        driver.active.launcher_cls(kernel.src, kernel.metadata)
    except Exception as error:  # an optimisation: the launch path stays correct without it
        logger.debug("could not pre-build the launcher of %s: %s", getattr(kernel, "name", kernel), error)
