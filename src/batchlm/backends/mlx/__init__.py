"""The MLX backend: batchlm's server API on top of mlx-lm (needs the `mlx` extra; import engine lazily).

mlx-lm is imported here, before any module of the backend imports it, so that its import cannot lower
the process's open-file limit (see mlx_lm_import)."""

from batchlm.backends.mlx.mlx_lm_import import import_mlx_lm

import_mlx_lm()
