"""Summary statistics of a sample (mean, median, std, percentiles), in pure Python."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, interpolating linearly between
    closest ranks (numpy's default method, so numbers match vLLM's)."""
    if not sorted_values:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = rank - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency metric, in the unit of its samples."""

    count: int = 0
    mean: float = 0.0
    median: float = 0.0
    # Population standard deviation (numpy's default, as vLLM reports).
    std: float = 0.0
    minimum: float = 0.0
    maximum: float = 0.0
    # Requested percentile -> value.
    percentiles: dict[float, float] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.count == 0

    def scaled(self, factor: float) -> Distribution:
        """The same summary with every value multiplied (seconds -> milliseconds)."""
        return Distribution(
            count=self.count,
            mean=self.mean * factor,
            median=self.median * factor,
            std=self.std * factor,
            minimum=self.minimum * factor,
            maximum=self.maximum * factor,
            percentiles={q: v * factor for q, v in self.percentiles.items()},
        )


def summarize(values: Sequence[float], percentiles: Sequence[float]) -> Distribution:
    """Summarizes a sample; an empty sample gives an empty Distribution with zero fields."""
    if not values:
        return Distribution(percentiles={q: 0.0 for q in percentiles})
    ordered = sorted(values)
    mean = math.fsum(ordered) / len(ordered)
    variance = math.fsum((v - mean) ** 2 for v in ordered) / len(ordered)
    return Distribution(
        count=len(ordered),
        mean=mean,
        median=percentile(ordered, 50.0),
        std=math.sqrt(variance),
        minimum=ordered[0],
        maximum=ordered[-1],
        percentiles={q: percentile(ordered, q) for q in percentiles},
    )
