"""Batched per-request sampling: logit processors, truncation filters, seeded draws and logprobs."""

from batchlm.sampling.sampler import Sampler, SamplerOutput
from batchlm.sampling.state import SamplingState, TokenStats

__all__ = ["Sampler", "SamplerOutput", "SamplingState", "TokenStats"]
