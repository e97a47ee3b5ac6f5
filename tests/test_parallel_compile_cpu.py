"""The parts of start-up's concurrent Triton compiles that run without a GPU (the compiles themselves are
tested in tests/gpu/test_parallel_compile.py)."""

from __future__ import annotations

import importlib.util

import pytest

from batchlm.kernels.parallel_compile import (
    COMPILE_THREADS_ENV,
    MAX_COMPILE_THREADS,
    DeferredCompiles,
    compile_deferred,
    compile_threads,
    defer_compiles,
)


def test_compile_threads_default_to_the_cores_up_to_a_cap() -> None:
    threads = compile_threads({})
    assert 1 <= threads <= MAX_COMPILE_THREADS


def test_compile_threads_follow_the_environment() -> None:
    assert compile_threads({COMPILE_THREADS_ENV: "1"}) == 1
    assert compile_threads({COMPILE_THREADS_ENV: " 12 "}) == 12


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_a_bad_thread_count_is_an_error_naming_the_variable(value: str) -> None:
    with pytest.raises(ValueError, match=COMPILE_THREADS_ENV):
        compile_threads({COMPILE_THREADS_ENV: value})


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None, reason="Triton is installed here")
def test_without_triton_nothing_is_deferred_and_nothing_compiles() -> None:
    with defer_compiles() as deferred:
        assert deferred is None
    compile_deferred(DeferredCompiles(), threads=2)  # nothing to do, and no error
