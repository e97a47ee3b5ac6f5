"""How long the fused CPU decode step's threads spin at a stage barrier before they sleep
(cpu_stage_barrier.c), adapted to how busy the machine is.

On a quiet machine the other threads reach a barrier within a few microseconds, so spinning skips the
slow wake-up of a sleeping virtual CPU. On a machine with more runnable threads than cores the thread
waited for may have lost its core, and a spinning thread only takes time from it: when many of a
step's waits outlast the spin and sleep anyway, the next steps sleep at once, and every so often one
step spins again to see whether the machine has become quiet (within a step the barrier itself
stops spinning after a few waits that outlasted it, which bounds what such a probe costs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SPIN_ENV = "BATCHLM_CPU_BARRIER_SPIN_US"  # microseconds; 0: always sleep at once (OpenMP passive style)
DEFAULT_SPIN_US = 50
# A step with more than this share of its waits sleeping counts as a busy machine.
BUSY_SHARE = 0.25
# Steps that sleep at once after a busy one, before one step spins again.
BACKOFF_STEPS = 8


@dataclass
class BarrierSpin:
    """Per-step spin budget: `budget_ns()` before a step, `record(...)` after it."""

    spin_ns: int
    backoff_left: int = 0

    def budget_ns(self) -> int:
        return 0 if self.backoff_left > 0 else self.spin_ns

    def record(self, spun_ns: int, waits: int, slept: int) -> None:
        """One step's outcome: the budget it ran with, its barrier waits and how many of them slept."""
        if spun_ns > 0 and slept > BUSY_SHARE * waits:
            self.backoff_left = BACKOFF_STEPS
        elif self.backoff_left > 0:
            self.backoff_left -= 1


def spin_from_env(environ: dict[str, str] | None = None) -> BarrierSpin:
    """The configured policy: SPIN_ENV microseconds, else DEFAULT_SPIN_US; bad values raise ValueError."""
    value = (os.environ if environ is None else environ).get(SPIN_ENV, "").strip()
    if not value:
        return BarrierSpin(DEFAULT_SPIN_US * 1000)
    try:
        microseconds = int(value)
    except ValueError:
        raise ValueError(f"{SPIN_ENV}={value!r} is not a whole number of microseconds") from None
    if microseconds < 0:
        raise ValueError(f"{SPIN_ENV}={value!r} must not be negative")
    return BarrierSpin(microseconds * 1000)
