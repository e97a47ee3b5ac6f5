"""core_builder helpers: freezing start-up objects out of the cyclic GC's reach."""

from __future__ import annotations

import gc

from batchlm.gc_tuning import freeze_startup_objects


def test_freeze_moves_existing_objects_to_the_permanent_generation() -> None:
    marker = [object()]
    gc.unfreeze()
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        assert not any(obj is marker for obj in gc.get_objects())  # frozen objects are not scanned
    finally:
        gc.unfreeze()
    assert any(obj is marker for obj in gc.get_objects())
