"""The mlx loop compiles a constrained request's grammar off its thread too: the other requests go on
decoding while it compiles (the compile blocks on an event here, so no timing is assumed)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import batchlm.backends.mlx  # noqa: F401  (first: it imports mlx-lm, keeping the open-file limit)

pytest.importorskip("mlx_lm")

from batchlm.backends.mlx.loader import LoadedModel, load_model
from batchlm.backends.mlx.loop import GenerationLoop, LoopSettings
from batchlm.config import EngineConfig
from batchlm.outputs import EngineCoreOutput, FinishReason
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams, StructuredOutputs
from batchlm.structured.factory import backend_factory
from batchlm.tokenizer.tokenizer import Tokenizer
from blocking_grammars import BLOCKED, FAILING, HANG_GUARD_S, Compiles, join_compile_threads

EOS = (1, 3)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> LoadedModel:
    return load_model(EngineConfig(model=str(model_dir)), model_dir)


@pytest.fixture
def compiles() -> Iterator[Compiles]:
    made = Compiles()
    yield made
    made.release.set()
    join_compile_threads()


def make_loop(loaded: LoadedModel, model_dir: Path, compiles: Compiles) -> GenerationLoop:
    settings = LoopSettings(
        max_num_seqs=8, prefill_step_size=64, prefill_batch_size=4, kv_budget_bytes=1 << 28
    )
    factory = compiles.factory(backend_factory)(
        EngineConfig(model=str(model_dir)), model_dir, loaded.vocab_size
    )
    return GenerationLoop(loaded.model, loaded.vocab_size, settings, "tiny", grammar_backend=factory)


def request(request_id: str, max_tokens: int, spec: StructuredOutputs | None = None) -> EngineCoreRequest:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=spec)
    return EngineCoreRequest(request_id, (0, 9, 4), params, EOS, time.time())


def tokens_of(outputs: list[EngineCoreOutput], request_id: str) -> list[int]:
    return [t for o in outputs if o.request_id == request_id for t in o.new_token_ids]


def test_a_plain_request_decodes_while_a_grammar_compiles(
    loaded: LoadedModel, model_dir: Path, compiles: Compiles, tiny_tokenizer: Tokenizer
) -> None:
    loop = make_loop(loaded, model_dir, compiles)
    loop.add_request(request("constrained", 10, BLOCKED))
    loop.add_request(request("plain", 100))
    # The compile is under way (and blocked) before any step. The bound only turns a compile that never
    # starts off the engine thread (it would start inside a step) into a failure instead of a hang.
    assert compiles.entered.wait(HANG_GUARD_S), "no compile started before the engine stepped"
    outputs: list[EngineCoreOutput] = []
    for _ in range(8):
        assert loop.can_step()
        outputs += loop.step()
    assert len(tokens_of(outputs, "plain")) >= 6 and not tokens_of(outputs, "constrained")
    compiles.release.set()
    while not any(o.request_id == "constrained" and o.finish_reason for o in outputs):
        outputs += loop.step()
    ids = [t for t in tokens_of(outputs, "constrained") if t not in EOS]
    assert re.fullmatch("[a-c]*", tiny_tokenizer.decode(ids))
    loop.close()


def test_an_abort_and_a_failing_grammar_while_compiling(
    loaded: LoadedModel, model_dir: Path, compiles: Compiles
) -> None:
    loop = make_loop(loaded, model_dir, compiles)
    loop.add_request(request("constrained", 10, BLOCKED))
    loop.add_request(request("failing", 10, FAILING))
    compiles.entered.wait()
    [aborted] = loop.abort_requests(["constrained"])
    assert aborted.finish_reason is FinishReason.ABORT
    outputs: list[EngineCoreOutput] = []
    while loop.has_work():  # the failing grammar's compile ends its request (the step waits for it)
        outputs += loop.step()
    [failed] = outputs
    assert failed.request_id == "failing" and failed.finish_reason is FinishReason.ERROR
    assert "does not compile for this tokenizer" in (failed.error or "")
    assert not loop.can_step()
    loop.close()  # with the aborted compile still blocked
