"""Which attention backend a device gets, chosen once at start-up."""

from __future__ import annotations

import logging

import torch

from batchlm.attention.backend import AttentionBackend

logger = logging.getLogger(__name__)


def choose_attention_backend(device: torch.device) -> AttentionBackend:
    """Our Triton kernels on CUDA when Triton is importable, torch otherwise."""
    if device.type == "cuda":
        try:
            from batchlm.attention.triton_backend import TritonAttentionBackend

            return TritonAttentionBackend()
        except ImportError as exc:  # pragma: no cover - depends on the install
            logger.warning("Triton attention unavailable (%s); using the torch attention backend", exc)
    from batchlm.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()
