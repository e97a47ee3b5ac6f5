"""The grammar mask process on CUDA: the staging ring in its shared memory is page-locked and uploads what
the child wrote in place, and a CUDA engine with the process (async scheduling, the stream waiting for
the masks) samples the tokens of one with the matchers in its own process."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from batchlm import LLM, SamplingParams
from batchlm.config import EngineConfig
from batchlm.sampling.grammar_mask import BitmaskStaging
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import allowed_tokens
from batchlm.structured.factory import OWN_PROCESS_ENV, backend_factory
from batchlm.structured.mask_process import ProcessBackend

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "colour"],
    "additionalProperties": False,
}
SPEC = StructuredOutputs(json=json.dumps(SCHEMA))


def test_the_ring_in_shared_memory_uploads_masks_written_in_place(
    tiny_model_dir: Callable[..., Path],
) -> None:
    model_dir = tiny_model_dir("llama")
    backend = backend_factory(EngineConfig(model=str(model_dir)), model_dir, 2080, True, own_process=True)(
        (1, 3)
    )
    assert isinstance(backend, ProcessBackend)
    try:
        staging = BitmaskStaging(torch.device("cuda"), backend.bitmask_words, backend.shared_array)
        matchers = [backend.matcher(SPEC) for _ in range(3)]
        buffer = staging.buffer(3)
        assert all(t.is_pinned() for t in staging._buffers), "registered with CUDA: uploads are DMA"
        buffer[:] = 0
        backend.fill_bitmasks(matchers, buffer)  # the child writes the ring's buffer itself
        assert len(allowed_tokens(buffer[0], 2080)) > 0
        expected = buffer.copy()
        uploaded = staging.upload(buffer, in_place=True)
        torch.cuda.synchronize()
        np.testing.assert_array_equal(uploaded.cpu().numpy(), expected)
        staging.buffer(40)  # a larger ring: the old buffers are unregistered, the new ones registered
        assert all(t.is_pinned() for t in staging._buffers)
    finally:
        backend.close()


def test_a_cuda_engine_with_the_mask_process_samples_the_same_tokens(
    tiny_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts, params = [], []
    for i in range(16):
        prompts += [f"constrained {i}", f"plain {i}"]
        params += [
            SamplingParams(temperature=1.0 if i % 2 else 0.0, seed=i, max_tokens=60, structured_outputs=SPEC),
            SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        ]
    tokens = {}
    for own_process in (False, True):
        monkeypatch.setenv(OWN_PROCESS_ENV, "1" if own_process else "0")
        llm = LLM(
            model=str(tiny_model_dir("llama")),
            device="cuda",
            dtype="float32",
            async_scheduling="on",
            num_gpu_blocks_override=256,
        )
        tokens[own_process] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        runner = llm.engine_core.executor
        assert isinstance(runner.grammars._backend, ProcessBackend) == own_process
        assert runner.masks.steps_handed_to_device > 10
        # With the process, the stream lands steady steps' tokens in its ring and it releases the
        # stream's flag itself.
        assert (runner.masks.steps_landed > 10) == own_process
        runner.grammars.close()
    assert tokens[True] == tokens[False]
