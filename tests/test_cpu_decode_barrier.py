"""The fused CPU decode step's stage barrier (kernels/cpu_stage_barrier.c) and its spin policy
(kernels/barrier_spin.py), and the LM head run inside the fused call: spinning or sleeping, with the
head in the call or after it, the step's logits and KV cache are bit for bit the same; the barrier
counts one wait per stage per thread but the last; the policy stops spinning after a step whose
waits mostly slept and tries again later.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.kernels import barrier_spin
from batchlm.kernels.barrier_spin import BACKOFF_STEPS, BarrierSpin, spin_from_env
from batchlm.kernels.cpu_decode_stack import stack_library
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.loader import LoadedModel, load_model
from batchlm.runner import fused_decode
from batchlm.runner.fused_decode import FusedDecode, build_fused_decode
from batchlm.runner.inputs import StepInputs
from gguf_builder import write_tiny_gguf
from models_harness import Chunk, build_step, make_kv_caches, run_step

CPU = torch.device("cpu")
BLOCK_SIZE = 16
PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [9] * 15]
needs_kernel = pytest.mark.skipif(stack_library() is None, reason="no AVX2 CPU or C compiler here")


def test_policy_spins_until_a_step_mostly_sleeps() -> None:
    spin = BarrierSpin(50_000)
    assert spin.budget_ns() == 50_000
    spin.record(50_000, waits=150, slept=10)  # a quiet step: a few waits outlasted the spin
    assert spin.budget_ns() == 50_000
    spin.record(50_000, waits=150, slept=100)  # a busy machine
    for _ in range(BACKOFF_STEPS):
        assert spin.budget_ns() == 0
        spin.record(0, waits=150, slept=150)  # sleeping at once says nothing about the machine
    assert spin.budget_ns() == 50_000  # one step tries again


def test_policy_reads_the_environment() -> None:
    assert spin_from_env({}).spin_ns == barrier_spin.DEFAULT_SPIN_US * 1000
    assert spin_from_env({barrier_spin.SPIN_ENV: "0"}).budget_ns() == 0
    assert spin_from_env({barrier_spin.SPIN_ENV: " 7 "}).spin_ns == 7000
    for bad in ("-1", "fast", "1.5"):
        with pytest.raises(ValueError, match=barrier_spin.SPIN_ENV):
            spin_from_env({barrier_spin.SPIN_ENV: bad})


def _model(tmp_path: Path) -> LoadedModel:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "Q8_0", False)
    return load_model(prepare_gguf_model_dir(gguf, tmp_path / "c"), torch.float32, CPU, progress=False)


def _decode(fused: FusedDecode, loaded: LoadedModel, caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Prefill PROMPTS through the model, then 10 greedy fused decode steps; each step's logits."""
    blocks = [[2 * r, 2 * r + 1] for r in range(len(PROMPTS))]
    logits = run_step(loaded.model, caches, [Chunk(p, 0, blocks[r]) for r, p in enumerate(PROMPTS)])
    lengths = [len(p) for p in PROMPTS]
    steps = []
    for _ in range(10):
        tokens = logits.argmax(-1).tolist()
        chunks = [Chunk([tokens[r]], lengths[r], blocks[r]) for r in range(len(PROMPTS))]
        input_ids, positions, meta = build_step(chunks, BLOCK_SIZE)
        inputs = StepInputs(input_ids, positions, meta, torch.arange(len(chunks)), ["0", "1"])
        logits = fused.run(inputs)
        steps.append(logits.clone())
        lengths = [n + 1 for n in lengths]
    return steps


@needs_kernel
@torch.inference_mode()
def test_spinning_sleeping_and_the_fused_head_give_the_same_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = _model(tmp_path)
    runs: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for name, spin_us, fuse_head in (("spin", "50", True), ("sleep", "0", True), ("head after", "50", False)):
        monkeypatch.setenv(barrier_spin.SPIN_ENV, spin_us)
        if not fuse_head:
            monkeypatch.setattr(fused_decode, "_head", lambda model: None)
        caches = make_kv_caches(loaded, 2 * len(PROMPTS), BLOCK_SIZE)
        fused = build_fused_decode(loaded.model, caches, TorchAttentionBackend())
        assert fused is not None and (fused.stack.head is not None) == fuse_head
        runs[name] = (_decode(fused, loaded, caches), caches)
    reference_logits, reference_caches = runs["spin"]
    for logits, caches in (runs["sleep"], runs["head after"]):
        assert all(torch.equal(a, b) for a, b in zip(logits, reference_logits, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(caches, reference_caches, strict=True))


@needs_kernel
@torch.inference_mode()
def test_the_barrier_counts_its_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorded: list[tuple[int, int, int]] = []
    monkeypatch.setattr(
        BarrierSpin, "record", lambda self, spun, waits, slept: recorded.append((spun, waits, slept))
    )
    loaded = _model(tmp_path)
    caches = make_kv_caches(loaded, 2 * len(PROMPTS), BLOCK_SIZE)
    fused = build_fused_decode(loaded.model, caches, TorchAttentionBackend())
    assert fused is not None
    _decode(fused, loaded, caches)
    layers = len(caches)
    for _, waits, slept in recorded:
        assert waits == 5 * layers * (torch.get_num_threads() - 1)
        assert 0 <= slept <= waits
