"""GPU tests share one process: each test's engines and tensors are released before the next test
starts, so a test that sizes its KV cache from free memory does not depend on the order (an engine
left to the garbage collector keeps its KV cache until a collection happens to run)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch


def _let_the_interpreter_index_with_scalars() -> None:
    """Triton's interpreter holds a scalar as a one-element array and turns it into a Python index
    with int(array), which numpy 2.4 refuses for an array of one dimension: every kernel whose loop
    runs between loaded bounds then fails under TRITON_INTERPRET=1 alone. The index is taken from
    the array's single element instead."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor: Any, scope: Any) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _let_the_interpreter_index_with_scalars()


def release_gpu_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def release_gpu_memory_after_test() -> Iterator[None]:
    yield
    release_gpu_memory()


@pytest.fixture(autouse=True, scope="module")
def release_gpu_memory_after_module() -> Iterator[None]:
    """The same for engines a module's fixtures keep for all its tests."""
    yield
    release_gpu_memory()
