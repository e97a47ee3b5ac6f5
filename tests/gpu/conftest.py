"""GPU tests share one process: each module's engines and tensors are released before the next
module starts, so a test that sizes its KV cache from free memory does not depend on the order."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def release_gpu_memory_after_module() -> Iterator[None]:
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
