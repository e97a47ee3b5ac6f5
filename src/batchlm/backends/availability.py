"""Whether the MLX backend can run here, checked without importing mlx (the engine modules and the
backend choice both ask)."""

from __future__ import annotations

import importlib.util
import platform
import sys

MLX_INSTALL_HINT = "pip install 'batchlm[mlx]'"


def mlx_available() -> bool:
    """True when mlx and mlx-lm can be imported (checked without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("mlx", "mlx_lm"))


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"
