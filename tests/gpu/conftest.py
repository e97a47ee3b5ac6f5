"""GPU tests share one process: each test's engines and tensors are released before the next test
starts, so a test that sizes its KV cache from free memory does not depend on the order (an engine
left to the garbage collector keeps its KV cache until a collection happens to run)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch


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
