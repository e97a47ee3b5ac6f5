"""An engine that goes out of scope frees its model and KV cache by reference counting alone: a
serving process freezes its start-up objects (gc_tuning), so a reference cycle through the runner
would keep them for the life of the process, and an in-process engine made again (a notebook, a test
module) would find its memory still taken."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from batchlm import LLM, SamplingParams
from batchlm.sampling_params import StructuredOutputs


@pytest.fixture
def no_cyclic_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _run_and_drop(model_dir: Path, **config: object) -> list[weakref.ref[object]]:
    llm = LLM(model=str(model_dir), device="cpu", **config)
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    constrained = SamplingParams(
        temperature=1.0, seed=3, max_tokens=6, structured_outputs=StructuredOutputs(regex="[a-z]{1,20}")
    )
    outputs = llm.generate([[1, 5, 9], [1, 5, 9, 5, 9, 5, 9]], [constrained, plain])
    assert all(len(o.outputs[0].token_ids) > 0 for o in outputs)
    runner = llm.engine_core.executor
    mask_worker = runner.grammars._worker  # type: ignore[attr-defined]  # its thread ends when it is freed
    assert mask_worker is not None
    # The last step's prefetch may still run (it holds the sequences until it ends): let it end.
    runner.grammars.compute_masks([])  # type: ignore[attr-defined]  # runs after every earlier mask job
    held = (llm, runner, runner.model, mask_worker, *runner.kv_caches)  # type: ignore[attr-defined]
    return [weakref.ref(obj) for obj in held]


@pytest.mark.usefixtures("no_cyclic_collector")
@pytest.mark.parametrize(
    "config",
    [{}, {"async_scheduling": "on"}, {"speculative": "ngram"}],
    ids=["sync", "async", "speculative"],
)
def test_a_dropped_engine_is_freed_without_the_cyclic_collector(
    tiny_model_dir: Callable[..., Path], config: dict[str, object]
) -> None:
    refs = _run_and_drop(tiny_model_dir("llama"), **config)
    alive = [ref() for ref in refs if ref() is not None]
    assert not alive, [type(obj).__name__ for obj in alive]
