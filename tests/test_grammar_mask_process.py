"""The grammar backend in a process of its own (structured.mask_process): the same acceptances and
masks as the backend in this process, masks written in place in shared memory or through its scratch
segment, grammars that fail to compile ending their sequence, a dead child failing calls (never a hang)
and releasing a waiting device's flag, no segment left behind, and an engine whose tokens do not change."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from batchlm import LLM, SamplingParams
from batchlm.config import EngineConfig
from batchlm.core.step_io import PLACEHOLDER_TOKEN_ID
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import allowed_tokens
from batchlm.structured.factory import OWN_PROCESS_ENV, backend_factory, local_backend
from batchlm.structured.llguidance_backend import LLGuidanceBackend
from batchlm.structured.mask_process import MaskProcessError, ProcessBackend, RemoteBatch
from batchlm.structured.mask_process_child import SHARED_MEMORY_DIR
from batchlm.structured.process_messages import LANDING_TIMEOUT_S, BackendSpec
from batchlm.structured.sequences import ConstrainedSequences
from batchlm.structured.shared_words import SharedWords
from batchlm.structured.step_masks import SampledRows

EOS = (1, 3)
VOCAB = 2080  # the tiny tokenizer's 2048 ids, padded as a model's logits are
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 5}, "n": {"type": "integer"}},
    "required": ["name", "n"],
}
SPECS = [
    StructuredOutputs(json=json.dumps(SCHEMA)),
    StructuredOutputs(regex="[a-z]{2,6}"),
    StructuredOutputs(choice=("yes", "no", "maybe")),
]


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def local(llama_dir: Path) -> LLGuidanceBackend:
    backend = backend_factory(EngineConfig(model=str(llama_dir)), llama_dir, VOCAB, own_process=False)(EOS)
    assert isinstance(backend, LLGuidanceBackend)
    return backend


@pytest.fixture
def remote(llama_dir: Path) -> Iterator[ProcessBackend]:
    backend = backend_factory(EngineConfig(model=str(llama_dir)), llama_dir, VOCAB, own_process=True)(EOS)
    assert isinstance(backend, ProcessBackend)
    yield backend
    backend.close()


def walk_tokens(bitmask: np.ndarray, rng: np.random.Generator, forbidden_every: int, step: int) -> list[int]:
    """One token a row: an allowed one, or now and then one its grammar forbids."""
    tokens = []
    for row in bitmask:
        allowed = allowed_tokens(row, VOCAB)
        if step % forbidden_every == 0 and len(allowed) < VOCAB:
            tokens.append(int(np.setdiff1d(np.arange(VOCAB), allowed)[0]))
        else:
            tokens.append(int(rng.choice(allowed)))
    return tokens


def test_the_same_acceptances_and_masks_as_in_process(
    local: LLGuidanceBackend, remote: ProcessBackend
) -> None:
    assert (remote.bitmask_words, remote.eos_token_ids) == (local.bitmask_words, local.eos_token_ids)
    specs = SPECS * 3
    ours = [local.matcher(spec) for spec in specs]
    theirs = [remote.matcher(spec) for spec in specs]
    words = local.bitmask_words
    expected = np.empty((len(specs), words), np.int32)
    local.fill_bitmasks(ours, expected)
    plain = np.full((len(specs), words), -1, np.int32)  # not shared: filled through the scratch segment
    remote.fill_bitmasks(theirs, plain)
    np.testing.assert_array_equal(plain, expected)

    # Advancing by matchers, several tokens for some rows and none for others.
    rng = np.random.default_rng(0)
    first = walk_tokens(expected, rng, forbidden_every=1000, step=1)
    new_tokens = [[t] if row % 3 else [] for row, t in enumerate(first)]
    assert remote.advance_and_fill(theirs, new_tokens, plain) == local.advance_and_fill(
        ours, new_tokens, expected
    )
    np.testing.assert_array_equal(plain, expected)

    # A prepared batch, one token a row a step, into shared memory (written in place).
    batch_ours, batch_theirs = local.batch(ours), remote.batch(theirs)
    shared = remote.shared_array(len(specs))
    for step in range(1, 12):
        tokens = walk_tokens(expected, rng, forbidden_every=5, step=step)
        accepted = batch_ours.step(tokens, expected)
        assert batch_theirs.step(tokens, shared) == accepted
        if step % 5 == 0:
            assert not all(accepted), "a forbidden token is rejected on both sides"
        np.testing.assert_array_equal(shared, expected)
    assert [m.is_terminated for m in theirs] == [m.is_terminated for m in ours]


def test_a_grammar_the_engine_cannot_compile_ends_its_sequence(remote: ProcessBackend) -> None:
    """The API edge rejects such specs; one that gets through allows only EOS, and no call fails."""
    matcher = remote.matcher(StructuredOutputs(regex="(unclosed"))
    row = np.empty(remote.bitmask_words, np.int32)
    matcher.fill_bitmask(row)
    assert set(allowed_tokens(row, VOCAB).tolist()) == set(EOS)
    assert matcher.is_terminated


def test_a_dead_child_fails_the_step_and_releases_the_device(remote: ProcessBackend) -> None:
    sequences = ConstrainedSequences(lambda eos: remote)
    tokens: list[int] = []
    sequences.add("a", SPECS[1], tokens, EOS)
    out = np.empty((1, remote.bitmask_words), np.int32)
    sequences.compute_masks([(0, "a")])
    os.kill(remote.pid, signal.SIGKILL)
    tokens.append(PLACEHOLDER_TOKEN_ID)
    released = threading.Event()
    job = sequences.prefetch_masks(SampledRows(["a"], [0], [0]), lambda: [40], out, released.set)
    with pytest.raises(MaskProcessError, match=r"exited|gone"):
        job.result(timeout=60)
    assert released.is_set(), "a device waiting for these masks is let go"
    with pytest.raises(MaskProcessError):
        sequences.compute_masks([(0, "a")])
    sequences.close()


def test_close_ends_the_child_and_leaves_no_segment(remote: ProcessBackend) -> None:
    matchers = [remote.matcher(SPECS[1]) for _ in range(2)]
    remote.fill_bitmasks(matchers, remote.shared_array(2))
    remote.fill_bitmasks(matchers[:1], np.empty((1, remote.bitmask_words), np.int32))  # makes the scratch
    assert remote._scratch is not None
    ours = {*remote._segments, remote._scratch.name}
    names = [name for name in os.listdir(SHARED_MEMORY_DIR) if name in ours]
    assert len(names) == 2
    remote.close()
    assert remote._process.returncode == 0
    assert not [name for name in names if os.path.exists(os.path.join(SHARED_MEMORY_DIR, name))]


def test_the_child_exits_when_the_engine_is_gone(remote: ProcessBackend) -> None:
    # What the engine's exit does to the socket (closing this end here would not: the answers'
    # reader is blocked on it).
    socket.socket(fileno=os.dup(remote._conn.fileno())).shutdown(socket.SHUT_RDWR)
    assert remote._process.wait(timeout=60) == 0  # a hang guard, far above the exit's time


def process_with_words(llama_dir: Path, landing_timeout_s: float) -> tuple[ProcessBackend, SharedWords]:
    words = SharedWords()
    spec = BackendSpec(EngineConfig(model=str(llama_dir)), llama_dir, VOCAB, False, EOS, 30)
    return ProcessBackend(spec, local_backend, words, landing_timeout_s), words


@pytest.fixture
def with_words(llama_dir: Path) -> Iterator[tuple[ProcessBackend, SharedWords]]:
    """A process whose calls wait for landed tokens as long as the engine's do (a slow machine's late
    landing is still a landing)."""
    backend, words = process_with_words(llama_dir, LANDING_TIMEOUT_S)
    yield backend, words
    backend.close()


def test_the_child_waits_for_landed_tokens_and_releases_the_written_word(
    local: LLGuidanceBackend, with_words: tuple[ProcessBackend, SharedWords]
) -> None:
    """Tokens the engine lands in the ring (here late, from another thread, in scrambled rows) are the
    ones the child advances by; it sets WRITTEN to the call's ticket once the masks are written."""
    remote, words = with_words
    ours = [local.matcher(spec) for spec in SPECS]
    theirs = [remote.matcher(spec) for spec in SPECS]
    batch_ours, batch_theirs = local.batch(ours), remote.batch(theirs)
    assert isinstance(batch_theirs, RemoteBatch)
    expected = np.empty((len(SPECS), local.bitmask_words), np.int32)
    batch_ours.fill(expected)
    shared = remote.shared_array(len(SPECS))
    rng = np.random.default_rng(1)
    token_rows = (4, 0, 2)  # the step sampled five rows; ours are these
    for step in range(1, 10):
        tokens = walk_tokens(expected, rng, forbidden_every=4, step=step)
        landing = remote.landing(5)
        sampled = [7, 7, 7, 7, 7]
        for row, token in zip(token_rows, tokens, strict=True):
            sampled[row] = token

        def land(landing=landing, sampled=sampled) -> None:
            landing.tokens[:] = sampled
            words.publish(SharedWords.LANDED, landing.where.ticket)

        threading.Timer(0.05, land).start()  # the call goes out before the tokens are there
        accepted = batch_theirs.step_landed(landing.where, token_rows, shared, release=100 + step)
        assert accepted == batch_ours.step(tokens, expected)
        np.testing.assert_array_equal(shared, expected)
        assert int(words.words[SharedWords.WRITTEN]) == 100 + step
    assert landing.where.ticket > 4, "the ring's slots come round again"


def test_calls_in_flight_together_are_answered_in_order(
    local: LLGuidanceBackend, with_words: tuple[ProcessBackend, SharedWords]
) -> None:
    """Two steps' calls posted before either step's tokens land (as the engine's worker does once a
    step is queued): each waits for its own landing, and each answer resolves its own call."""
    remote, words = with_words
    spec = StructuredOutputs(regex="[a-z]{3}")
    ours, theirs = local.matcher(spec), remote.matcher(spec)
    batch = remote.batch([theirs])
    assert isinstance(batch, RemoteBatch)
    expected = np.empty((1, local.bitmask_words), np.int32)
    ours.fill_bitmask(expected[0])
    letter = int(allowed_tokens(expected[0], VOCAB)[0])
    first, second = remote.shared_array(1), remote.shared_array(1)
    landings = [remote.landing(1), remote.landing(1)]
    answers = [
        batch.post_landed(landing.where, (0,), out, release=None)
        for landing, out in zip(landings, (first, second), strict=True)
    ]
    assert not any(answer.done() for answer in answers), "nothing has landed"
    for landing in landings:
        landing.tokens[:] = [letter]
        words.publish(SharedWords.LANDED, landing.where.ticket)
    assert [answer.result(timeout=60).accepted for answer in answers] == [[True], [True]]
    for out in (first, second):
        assert ours.accept(letter)
        ours.fill_bitmask(expected[0])
        np.testing.assert_array_equal(out, expected)


def test_tokens_that_never_land_fail_the_call(llama_dir: Path) -> None:
    remote, _ = process_with_words(llama_dir, landing_timeout_s=2.0)
    try:
        batch = remote.batch([remote.matcher(SPECS[1])])
        assert isinstance(batch, RemoteBatch)
        out = np.empty((1, remote.bitmask_words), np.int32)
        with pytest.raises(MaskProcessError, match="never landed"):
            batch.step_landed(remote.landing(1).where, (0,), out, release=None)
        batch.fill(out)  # the child serves on
    finally:
        remote.close()


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_an_engine_samples_the_same_tokens(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch, async_scheduling: str
) -> None:
    prompts = [f"request {i}" for i in range(8)]
    params = [
        SamplingParams(
            temperature=1.0 if i % 2 else 0.0, seed=i, max_tokens=40, structured_outputs=SPECS[i % 3]
        )
        if i % 4
        else SamplingParams(temperature=0.0, max_tokens=20)
        for i in range(8)
    ]
    results = {}
    for own_process in (False, True):
        monkeypatch.setenv(OWN_PROCESS_ENV, "1" if own_process else "0")
        llm = LLM(model=str(llama_dir), device="cpu", async_scheduling=async_scheduling)
        results[own_process] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        runner = llm.engine_core.executor  # type: ignore[attr-defined]
        assert isinstance(runner.grammars._backend, ProcessBackend) == own_process
        # With the process, steady steps' tokens went to it directly (ConstrainedSequences.token_landing).
        assert (runner.masks.steps_landed > 10) == own_process
        runner.grammars.close()
    assert results[True] == results[False]
