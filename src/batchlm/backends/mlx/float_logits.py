"""The model as the MLX loop runs it: its logits widened to float32 before mlx-lm normalises them."""

from __future__ import annotations

from typing import Any

import mlx.core as mx


class Float32Logits:
    """Calls the model and casts its logits to float32; every other attribute is the model's.

    mlx-lm turns logits into log-probabilities in their own dtype, and samples and reports those: a
    bfloat16 model's land on a grid of 1/32 around -7 (reported logprobs off by up to 0.016, tied
    alternatives, greedy picking the lowest id among tokens the grid ties). The torch engine widens
    logits to float32 first; so does this. Only the positions a caller evaluates are cast (prefill
    chunks' logits are never evaluated)."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        logits: mx.array = self._model(*args, **kwargs)
        return logits.astype(mx.float32)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
