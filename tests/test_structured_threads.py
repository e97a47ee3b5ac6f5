"""How many llguidance threads compute a step's masks: most of a GPU host's cores (they idle while the
device runs the model), half of a CPU engine's (the model needs the rest)."""

from __future__ import annotations

import pytest

from batchlm.structured import factory


@pytest.mark.parametrize(
    ("cores", "on_accelerator", "threads"),
    [
        (2, False, 1),
        (16, False, 8),
        (64, False, 8),
        (1, True, 1),
        (4, True, 1),
        (8, True, 4),
        (16, True, 12),
        (64, True, 16),
    ],
)
def test_mask_threads(
    monkeypatch: pytest.MonkeyPatch, cores: int, on_accelerator: bool, threads: int
) -> None:
    monkeypatch.setattr(factory.os, "cpu_count", lambda: cores)
    assert factory.mask_threads(on_accelerator) == threads
