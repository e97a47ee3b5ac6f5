"""Engine backends: pick the PyTorch engine or the MLX (Apple Silicon, via mlx-lm) engine for the server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchlm.backends.availability import MLX_INSTALL_HINT, is_apple_silicon, mlx_available

if TYPE_CHECKING:
    from batchlm.config import EngineConfig
    from batchlm.engine.client import EngineClient

__all__ = [
    "BACKEND_CHOICES",
    "MLX_INSTALL_HINT",
    "create_engine",
    "is_apple_silicon",
    "mlx_available",
    "resolve_backend",
]

# Values of `batchlm serve --backend`.
BACKEND_CHOICES = ("auto", "torch", "mlx")


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
