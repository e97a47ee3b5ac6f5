"""Grammar masks on CUDA: the device unpacking and batched application equal the CPU path, other rows'
logits are untouched, and the CUDA engine (async scheduling, CUDA graphs) keeps constrained outputs valid
and unconstrained tokens unchanged."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from devices import require_cuda
from engine_runs import sync_and_async_engines

from batchlm import LLM, SamplingParams
from batchlm.runner.host_flag import DEVICE_WAIT_ENV, stream_flag
from batchlm.sampling.grammar_mask import STAGING_SLOTS, BitmaskStaging, apply_grammar_masks
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.step_masks import GrammarMasks

pytestmark = pytest.mark.gpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from staggered_requests import REQUESTS, serve_staggered  # noqa: E402

require_cuda()

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


@pytest.mark.parametrize("rows", [(0, 1, 2, 3, 4, 5), (1, 4), (5,)])
@pytest.mark.parametrize("vocab_size", [1000, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_masks_equal_cpu_masks_and_leave_other_rows_alone(
    rows: tuple[int, ...], vocab_size: int, dtype: torch.dtype
) -> None:
    generator = np.random.default_rng(0)
    words = (vocab_size + 31) // 32
    bitmask = generator.integers(-(2**31), 2**31 - 1, size=(len(rows), words), dtype=np.int64).astype(
        np.int32
    )
    logits = torch.randn(6, vocab_size, generator=torch.Generator().manual_seed(1))
    on_cpu = logits.clone()
    apply_grammar_masks(on_cpu, GrammarMasks(rows, bitmask))
    on_gpu = logits.to("cuda", dtype)  # a bf16 model's logits are masked as they are
    apply_grammar_masks(on_gpu, GrammarMasks(rows, bitmask))
    assert torch.equal(on_gpu.cpu(), on_cpu.to(dtype))
    for row in set(range(6)) - set(rows):
        assert torch.equal(on_cpu[row], logits[row])


def test_staging_ring_uploads_its_own_buffers_and_copies_others() -> None:
    staging = BitmaskStaging(torch.device("cuda"), words=5)
    uploads = []
    for step in range(2 * STAGING_SLOTS + 1):
        buffer = staging.buffer(3)
        buffer[:] = step
        uploads.append(staging.upload(buffer))  # its own buffer: sent as is
    foreign = np.arange(10, dtype=np.int32).reshape(2, 5)
    copied = staging.upload(foreign)  # anything else: copied into the ring first
    grown = staging.buffer(40)  # more rows than before: a larger ring
    grown[:] = 7
    torch.cuda.synchronize()
    assert [int(u.unique().item()) for u in uploads] == list(range(2 * STAGING_SLOTS + 1))
    assert torch.equal(copied.cpu(), torch.from_numpy(foreign))
    assert torch.equal(staging.upload(grown).cpu(), torch.full((40, 5), 7, dtype=torch.int32))


def test_cuda_engine_constrained_outputs_validate(tiny_model_dir: Callable[..., Path]) -> None:
    """Validity under async scheduling and CUDA graphs. (Token equality with a run without the constrained
    requests is pinned on the CPU engine and by the mask test above: on the GPU, a different batch size
    may pick different matmul kernels, which is not the grammar's doing.)"""
    llm = LLM(model=str(tiny_model_dir("llama")), device="cuda")
    assert llm.engine_core.async_scheduling
    plain_prompts = [f"plain {i}" for i in range(32)]
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    spec = StructuredOutputs(json=json.dumps(SCHEMA))
    prompts, params = [], []
    for i in range(32):
        constrained = SamplingParams(
            temperature=1.0 if i % 2 else 0.0, seed=i, max_tokens=100, structured_outputs=spec
        )
        prompts += [f"constrained {i}", plain_prompts[i]]
        params += [constrained, plain]
    outputs = llm.generate(prompts, params)
    for output in outputs[0::2]:
        assert output.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(output.outputs[0].text), SCHEMA)
    assert all(len(o.outputs[0].token_ids) == 24 for o in outputs[1::2])


def test_cuda_a_grammar_failing_in_steady_decoding_ends_in_an_error(
    tiny_model_dir: Callable[..., Path],
) -> None:
    """A grammar that fails a few tokens in (700 optional properties under a key, past llguidance's
    2,000 items in a parser row), among constrained requests decoding steadily, masks handed to the
    device: it ends in an error naming the limit; the others stay valid."""
    llm = LLM(model=str(tiny_model_dir("llama")), device="cuda")
    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(700)}}
    nested = {
        "type": "object",
        "properties": {"first": {"type": "string", "maxLength": 4}, "a": many},
        "required": ["first", "a"],
        "additionalProperties": False,
    }
    spec = StructuredOutputs(json=json.dumps(SCHEMA))
    prompts = [f"constrained {i}" for i in range(16)] + ["failing"]
    params = [SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=spec)] * 16
    params += [
        SamplingParams(
            temperature=0.0, max_tokens=80, structured_outputs=StructuredOutputs(json=json.dumps(nested))
        )
    ]
    outputs = llm.generate(prompts, params)
    failed = outputs[-1]
    assert failed.outputs[0].finish_reason == "error"
    assert failed.error is not None and "max is 2000" in failed.error
    assert len(failed.outputs[0].token_ids) >= 3  # it failed while decoding, not at its first token
    for output in outputs[:-1]:
        assert output.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(output.outputs[0].text), SCHEMA)
    assert llm.engine_core.executor.masks.steps_handed_to_device > 0


def test_cuda_deferred_sampling_gives_the_tokens_of_the_synchronous_engine(
    tiny_model_dir: Callable[..., Path],
) -> None:
    """Under async scheduling a constrained step's sampling waits for the next runner call, and the step
    after it builds its inputs first and takes the placeholders' tokens afterwards on the device: the
    same batches as the synchronous engine, so exactly its tokens (float32)."""
    engines = sync_and_async_engines(tiny_model_dir("llama"))
    spec = StructuredOutputs(json=json.dumps(SCHEMA))
    prompts, params = [], []
    for i in range(16):
        prompts += [f"constrained {i}", f"plain {i}"]
        params += [
            SamplingParams(temperature=1.0 if i % 2 else 0.0, seed=i, max_tokens=60, structured_outputs=spec),
            SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        ]
    tokens = {
        mode: [o.outputs[0].token_ids for o in llm.generate(prompts, params)] for mode, llm in engines.items()
    }
    assert engines["on"].engine_core.async_scheduling
    assert tokens["on"] == tokens["off"]
    # Most constrained steps were sampled behind the stream's wait for their masks.
    assert engines["on"].engine_core.executor.masks.steps_handed_to_device > 10


def test_the_stream_waits_for_the_host_flag_and_then_reads_what_the_host_wrote() -> None:
    flag = stream_flag(torch.device("cuda"))
    assert flag is not None, "the driver takes 32-bit stream waits"
    source = torch.zeros(4, dtype=torch.int32, pin_memory=True)
    try:
        flag.wait_on_device(1)
        copied = source.to("cuda", non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        assert not done.query(), "the copy is held behind the wait"
        source[:] = 7  # written after the copy was queued, before the release
    finally:
        flag.release(1)  # never leave the stream blocked for the tests after this one
    done.synchronize()
    assert copied.tolist() == [7, 7, 7, 7]
    flag.wait_on_device(1)  # a ticket already released: nothing waits
    torch.cuda.synchronize()


def test_cuda_staggered_requests_under_handed_masks_keep_the_tokens(
    tiny_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests joining and leaving every few steps: the steps the stream waits for and those the
    engine thread gathers on the host mix, with the tokens of the engine thread waiting for every mask
    itself (float32, the same batches)."""
    spec = StructuredOutputs(json=json.dumps(SCHEMA))

    def engine() -> LLM:
        return LLM(
            model=str(tiny_model_dir("llama")),
            device="cuda",
            dtype="float32",
            async_scheduling="on",
            num_gpu_blocks_override=256,
        )

    monkeypatch.setenv(DEVICE_WAIT_ENV, "0")
    waiting_engine = engine()
    waiting = serve_staggered(waiting_engine, spec)
    assert waiting_engine.engine_core.executor.masks.steps_handed_to_device == 0
    monkeypatch.delenv(DEVICE_WAIT_ENV)
    handing_engine = engine()
    handing = serve_staggered(handing_engine, spec)
    assert handing.tokens == waiting.tokens
    assert len(handing.finish_reasons) == REQUESTS
    for request_id, reason in handing.finish_reasons.items():
        if reason == "stop":
            text = handing_engine.tokenizer.decode(handing.tokens[request_id])
            jsonschema.validate(json.loads(text), SCHEMA)
    assert handing_engine.engine_core.executor.masks.steps_handed_to_device > 0
