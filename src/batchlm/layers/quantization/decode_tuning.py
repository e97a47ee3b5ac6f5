"""Start-up timing of the linears' decode launches: every distinct weight shape of a model
once (layers of a shape share the chosen launch), before the decode CUDA graphs are captured."""

from __future__ import annotations

import logging

import torch
from torch import nn

from batchlm.kernels.decode_plans import DECODE_DTYPES, TIMING_LAYERS
from batchlm.layers.quantization.base import LinearMethod
from batchlm.layers.quantization.layer import MethodLayer

logger = logging.getLogger(__name__)


def layers_by_shape(model: nn.Module) -> dict[tuple[int, int, int], list[MethodLayer]]:
    """The model's method layers grouped by (method, rows, cols), at most TIMING_LAYERS each."""
    groups: dict[tuple[int, int, int], list[MethodLayer]] = {}
    for module in model.modules():
        if isinstance(module, MethodLayer):
            key = (id(module.method), module.weight_rows, module.weight_cols)
            group = groups.setdefault(key, [])
            if len(group) < TIMING_LAYERS:
                group.append(module)
    return groups


def tune_decode_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Let each layer method time its decode launches per weight shape; returns the shapes timed."""
    if dtype not in DECODE_DTYPES:
        return 0
    timed = 0
    for layers in layers_by_shape(model).values():
        method = layers[0].method
        if (
            type(method).tune_decode is not LinearMethod.tune_decode
            and layers[0].weight.device.type == "cuda"
        ):
            method.tune_decode(layers, dtype)
            timed += 1
    if timed:
        logger.info("linears: decode launches timed for %d weight shapes", timed)
    return timed
