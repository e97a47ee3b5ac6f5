"""batchlm: a fast, lightweight LLM inference server with continuous batching."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchlm.outputs import CompletionOutput, RequestOutput
from batchlm.sampling_params import SamplingParams

__version__ = "0.1.0"

if TYPE_CHECKING:
    from batchlm.engine.llm import LLM

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Import the engine lazily so `import batchlm` (and the bench client) stay light.
    if name == "LLM":
        from batchlm.engine.llm import LLM

        return LLM
    raise AttributeError(name)
