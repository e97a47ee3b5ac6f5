"""The MLX backend: batchlm's server API on top of mlx-lm (needs the `mlx` extra; import engine lazily)."""
