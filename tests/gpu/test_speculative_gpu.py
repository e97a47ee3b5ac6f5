"""Speculative decoding on CUDA (verify steps replay the decode CUDA graphs as one decode row per token,
with and without async scheduling): the same tokens as without speculation, drafts accepted, no block
held, and no verify step run eagerly unless it has more rows than the largest graph."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from devices import require_cuda
from engine_runs import generated_tokens

from batchlm import LLM, SamplingParams
from batchlm.runner import cuda_graph
from batchlm.runner.inputs import StepInputs
from batchlm.runner.model_runner import ModelRunner

pytestmark = pytest.mark.gpu

require_cuda()

# Random tiny models fall into cycles under greedy decoding; this prompt's output is copied a lot.
LOOPING = [5, 6, 7, 8, 9] * 6


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Callable[..., Path]) -> dict[str, LLM]:
    model_dir = tiny_model_dir("llama")
    # A fixed KV cache: a second engine would otherwise count the first one's memory as taken.
    return {
        f"{speculative}-{scheduling}": LLM(
            model=str(model_dir),
            device="cuda",
            dtype="float32",
            speculative=speculative,
            async_scheduling=scheduling,
            num_gpu_blocks_override=256,
        )
        for speculative in ("off", "ngram")
        for scheduling in ("off", "on")
    }


@pytest.mark.parametrize("scheduling", ["off", "on"])
def test_same_tokens_with_speculation(engines: dict[str, LLM], scheduling: str) -> None:
    prompts = [LOOPING, LOOPING[:17], list(range(40, 80)), [11, 12, 13]]
    params = [
        SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=80, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=4, max_tokens=60, ignore_eos=True, n=2),
    ]
    spec = engines[f"ngram-{scheduling}"]
    before = spec.engine_core.scheduler.stats().spec_accepted_tokens_total
    assert generated_tokens(spec, prompts, params) == generated_tokens(
        engines[f"off-{scheduling}"], prompts, params
    )
    assert spec.engine_core.scheduler.stats().spec_accepted_tokens_total > before
    assert spec.engine_core.async_scheduling == (scheduling == "on")


def _outputs(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[Any]:
    """Each choice's (token ids, finish reason, logprob of each token) and the prompt's logprobs."""
    outputs = llm.generate(prompts, params)
    scheduler = llm.engine_core.scheduler
    assert scheduler.num_free_blocks == scheduler.num_total_blocks
    return [
        (
            [
                (
                    c.token_ids,
                    c.finish_reason,
                    None if c.logprobs is None else [e.logprob for e in c.logprobs],
                )
                for c in output.outputs
            ],
            None
            if output.prompt_logprobs is None
            else [None if e is None else e.logprob for e in output.prompt_logprobs],
        )
        for output in outputs
    ]


@pytest.mark.parametrize("scheduling", ["off", "on"])
def test_stops_limits_logprobs_and_biases_with_speculation(engines: dict[str, LLM], scheduling: str) -> None:
    """A stop token or max_tokens reached inside a run of accepted drafts, a logprob for every accepted
    token, logit_bias and min_tokens at every draft position, prompt logprobs: what plain decoding gives
    (logprobs to float rounding). The prompt runs first once, so the n-gram pool drafts all of it."""
    spec, plain = engines[f"ngram-{scheduling}"], engines[f"off-{scheduling}"]
    greedy = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    [[(tokens, _)]] = generated_tokens(plain, [LOOPING], [greedy])
    first: dict[int, int] = {}
    for index, token in enumerate(tokens):
        first.setdefault(token, index)
    stop_token = max(first, key=first.__getitem__)  # the token that first occurs latest
    end = first[stop_token]
    params = [
        SamplingParams(
            temperature=0.0, max_tokens=100, ignore_eos=True, stop_token_ids=[stop_token], logprobs=2
        ),
        SamplingParams(temperature=0.0, max_tokens=max(end - 3, 1), ignore_eos=True, logprobs=0),
        SamplingParams(
            temperature=0.0, max_tokens=60, ignore_eos=True, logit_bias={tokens[3]: 1.5}, logprobs=1
        ),
        SamplingParams(temperature=0.8, seed=5, max_tokens=60, min_tokens=20, logprobs=1),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, prompt_logprobs=2),
    ]
    prompts = [LOOPING] * len(params)
    generated_tokens(spec, [LOOPING], [greedy])
    before = spec.engine_core.scheduler.stats().spec_accepted_tokens_total
    expected, got = _outputs(plain, prompts, params), _outputs(spec, prompts, params)
    assert spec.engine_core.scheduler.stats().spec_accepted_tokens_total > before
    for (choices, prompt_logprobs), (choices2, prompt_logprobs2) in zip(expected, got, strict=True):
        for (ids, finish, logprobs), (ids2, finish2, logprobs2) in zip(choices, choices2, strict=True):
            assert (ids, finish) == (ids2, finish2)
            assert logprobs2 is None or len(logprobs2) == len(ids2)
            assert logprobs2 == (None if logprobs is None else pytest.approx(logprobs, abs=1e-3))
        assert prompt_logprobs2 == (
            None if prompt_logprobs is None else pytest.approx(prompt_logprobs, abs=1e-3)
        )
    [stopped, cut] = [choices[0] for choices, _ in got[:2]]
    assert (len(stopped[0]), stopped[1]) == (end + 1, "stop")
    assert (len(cut[0]), cut[1]) == (max(end - 3, 1), "length")


def test_single_request_decodes_in_fewer_steps(engines: dict[str, LLM]) -> None:
    params = [SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)]
    spec, plain = engines["ngram-off"], engines["off-off"]
    steps = {}
    for name, llm in (("spec", spec), ("plain", plain)):
        start = llm.engine_core.num_steps
        tokens = generated_tokens(llm, [LOOPING], params)
        steps[name] = (llm.engine_core.num_steps - start, tokens)
    assert steps["spec"][1] == steps["plain"][1]
    assert steps["spec"][0] < steps["plain"][0]


class ForwardLog:
    """Records, for each forward of a runner, whether it verified drafts and whether the model ran
    eagerly (a graph replay never calls the model's Python forward)."""

    def __init__(self, runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[tuple[bool, bool]] = []  # (has drafts, eager)
        self._eager = 0
        model_forward, runner_forward = runner.model.forward, runner._forward

        def eager(*args: Any, **kwargs: Any) -> Any:
            self._eager += 1
            return model_forward(*args, **kwargs)

        def forward(inputs: StepInputs) -> torch.Tensor:
            before = self._eager
            logits = runner_forward(inputs)
            self.steps.append((inputs.has_drafts, self._eager > before))
            return logits

        monkeypatch.setattr(runner.model, "forward", eager)
        monkeypatch.setattr(runner, "_forward", forward)

    def verify_steps(self) -> list[bool]:
        """Whether each verify step ran eagerly."""
        return [eager for has_drafts, eager in self.steps if has_drafts]


def _runner(llm: LLM) -> ModelRunner:
    runner = llm.engine_core.executor
    assert isinstance(runner, ModelRunner) and runner.decode_graphs is not None
    return runner


@pytest.mark.parametrize("scheduling", ["off", "on"])
def test_verify_steps_replay_the_decode_graphs(
    engines: dict[str, LLM], scheduling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = engines[f"ngram-{scheduling}"]
    runner = _runner(spec)
    # Graphs for every step of verify chunks: 32 requests (max_num_seqs) x (1 + 4 drafts) rows.
    assert runner.decode_graphs is not None and runner.decode_graphs.max_batch == 32 * 5
    log = ForwardLog(runner, monkeypatch)
    # No two prompts share a block, so all three are admitted in the first step (the one eager forward).
    prompts = [LOOPING, list(range(100, 140)), [(7 * i + 3) % 300 for i in range(20)] * 3]
    params = [SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)] * 3
    assert generated_tokens(spec, prompts, params) == generated_tokens(
        engines[f"off-{scheduling}"], prompts, params
    )
    verify = log.verify_steps()
    assert verify and not any(verify), f"{sum(verify)} of {len(verify)} verify steps ran eagerly"
    assert sum(eager for _, eager in log.steps) == 1  # the one step with the prompts


def test_verify_rows_past_the_largest_graph_run_eagerly(
    tiny_model_dir: Callable[..., Path], engines: dict[str, LLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graphs up to 4 rows (verify rows capped at 4 here); a verify chunk of 1 + 4 tokens falls back
    to the eager path, with the same tokens."""
    monkeypatch.setattr(cuda_graph, "MAX_VERIFY_GRAPH_ROWS", 4)
    small = LLM(
        model=str(tiny_model_dir("llama")),
        device="cuda",
        dtype="float32",
        speculative="ngram",
        num_speculative_tokens=4,
        async_scheduling="off",
        max_num_seqs=4,
        num_gpu_blocks_override=64,
    )
    runner = _runner(small)
    assert runner.decode_graphs is not None and runner.decode_graphs.max_batch == 4
    log = ForwardLog(runner, monkeypatch)
    params = [SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)]
    assert generated_tokens(small, [LOOPING], params) == generated_tokens(
        engines["off-off"], [LOOPING], params
    )
    verify = log.verify_steps()
    assert verify and any(verify)


def test_graph_steps_with_a_prompt_token_that_samples_nothing(tiny_model_dir: Callable[..., Path]) -> None:
    """A 2-token budget: a decode plus a prompt's next single token is a step of one-token chunks,
    which the graphs take although the prompt's row samples nothing; the same tokens as eager."""
    engines = [
        LLM(
            model=str(tiny_model_dir("llama")),
            device="cuda",
            dtype="float32",
            speculative="off",
            max_num_batched_tokens=2,
            num_gpu_blocks_override=64,
            enforce_eager=eager,
        )
        for eager in (False, True)
    ]
    prompts = [[11, 12, 13], list(range(40, 50))]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)] * 2
    graphs, eager = (generated_tokens(llm, prompts, params) for llm in engines)
    assert graphs == eager
