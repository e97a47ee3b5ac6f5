"""Executors the engine core drives besides a single in-process ModelRunner: tensor parallelism over
worker processes, one ModelRunner per rank."""
