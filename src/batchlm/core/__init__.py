"""Engine core: block manager, scheduler and the step loop. Pure Python: never imports torch."""
