"""How the OpenMP threads of a CPU engine wait between parallel regions.

libgomp's default spins up to ~300,000 times before sleeping. When another busy process shares the
cores, a spinning thread holds the core that the thread it waits for needs, and single-stream decode
slows many times over; threads that sleep at once give it up (BENCHMARKS.md, "CPU: OpenMP wait
policy"). libgomp reads its settings once, when torch loads it, so the policy is set before torch is
imported. Torch-free on purpose."""

from __future__ import annotations

import os
import sys
from pathlib import Path

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
# Either of these set by the user is their choice of waiting, kept as it is.
USER_WAIT_SETTINGS = (WAIT_POLICY_ENV, "GOMP_SPINCOUNT")


def engine_on_cpu(device: str) -> bool:
    """Whether `device` ("auto" included) will be the CPU. With "auto" the GPU is assumed when the
    NVIDIA driver's device node exists: this is decided before torch (which knows) is imported."""
    return device == "cpu" or (device == "auto" and not Path("/dev/nvidiactl").exists())


def prefer_passive_waiting(device: str, environ: dict[str, str] | None = None) -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE for a CPU engine unless the user chose how OpenMP waits, or torch
    (and with it libgomp) is loaded already. Returns whether it was set."""
    env = os.environ if environ is None else environ
    if not engine_on_cpu(device) or any(name in env for name in USER_WAIT_SETTINGS):
        return False
    if "torch" in sys.modules:
        return False
    env[WAIT_POLICY_ENV] = "PASSIVE"
    return True


def describe_wait_policy(environ: dict[str, str] | None = None) -> str:
    """The OpenMP wait settings in effect, for the start-up log."""
    env = os.environ if environ is None else environ
    chosen = [f"{name}={env[name]}" for name in USER_WAIT_SETTINGS if name in env]
    return ", ".join(chosen) if chosen else "libgomp's default wait policy"
