"""Engine backends: pick the PyTorch engine or the MLX (Apple Silicon, via mlx-lm) engine for the server."""

from __future__ import annotations

import importlib.util
import platform
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchlm.config import EngineConfig
    from batchlm.engine.client import EngineClient

# Values of `batchlm serve --backend`.
BACKEND_CHOICES = ("auto", "torch", "mlx")
MLX_INSTALL_HINT = "pip install 'batchlm[mlx]'"


def mlx_available() -> bool:
    """True when mlx and mlx-lm can be imported (checked without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("mlx", "mlx_lm"))


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def resolve_backend(name: str) -> str:
    """Returns "torch" or "mlx"; "auto" means mlx on Apple Silicon with mlx installed, else torch.
    Raises ValueError for an unknown name, or for "mlx" without mlx installed."""
    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_CHOICES)}")
    if name == "auto":
        return "mlx" if is_apple_silicon() and mlx_available() else "torch"
    if name == "mlx" and not mlx_available():
        raise ValueError(f"the mlx backend needs the mlx and mlx-lm packages: {MLX_INSTALL_HINT}")
    return name


def create_engine(backend: str, config: EngineConfig, *, max_queue: int | None = None) -> EngineClient:
    """An unstarted engine for `backend` (any of BACKEND_CHOICES); the caller awaits its start()."""
    if resolve_backend(backend) == "mlx":
        from batchlm.backends.mlx.engine import MLXEngine

        return MLXEngine(config, max_queue=max_queue)
    from batchlm.engine.async_engine import AsyncLLMEngine

    return AsyncLLMEngine(config, max_queue=max_queue)
