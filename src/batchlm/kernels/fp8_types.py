"""The FP8 format the kernels and the quantized layers share: e4m3, whose largest finite value bounds
every scale."""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
