"""A constrained request that reuses the id of one that just ended gets masks of its own grammar: the
masks prefetched after the ended request's last token (kept until the next step that samples) are not
handed to it by id."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batchlm import LLM, SamplingParams
from batchlm.outputs import FinishReason
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import StructuredOutputs


@pytest.mark.parametrize("scheduling", ["off", "on"])
def test_a_reused_id_gets_its_own_grammars_masks(
    tiny_model_dir: Callable[..., Path], scheduling: str
) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), device="cpu", async_scheduling=scheduling)
    core, eos = llm.engine_core, llm.tokenizer.eos_token_ids

    def run(regex: str) -> tuple[list[int], FinishReason | None, str | None]:
        params = SamplingParams(
            temperature=0.0, max_tokens=8, structured_outputs=StructuredOutputs(regex=regex)
        )
        core.add_request(EngineCoreRequest("same", (1, 5, 9, 4), params, eos, time.time()))
        tokens: list[int] = []
        finish, error = None, None
        while core.has_work():
            for output in core.step():
                tokens += output.new_token_ids
                finish, error = output.finish_reason or finish, output.error or error
        return tokens, finish, error

    run("[a-c]{1,3}")  # ends by EOS well before max_tokens
    tokens, finish, error = run("[a-c]{20,30}")  # cannot end within max_tokens
    assert (finish, error) == (FinishReason.LENGTH, None)
    assert re.fullmatch("[a-c]+", llm.tokenizer.decode(tokens, skip_special_tokens=True))
