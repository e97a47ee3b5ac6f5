"""The sampling values a model recommends (generation_config.json, or a GGUF file's general.sampling
metadata) fill the fields a request leaves out: read once per model (sampling_defaults.py), carried by
the served model's facts, applied at the edge and by LLM.generate without SamplingParams."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchlm import LLM, SamplingParams
from batchlm.config import EngineConfig
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.sampling_defaults import SamplingDefaults, check_generation_config, sampling_defaults
from batchlm.server.background import BackgroundServer
from fake_engine import FakeEngine
from gguf_builder import write_tiny_gguf

QWEN_LIKE = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def _with_generation_config(directory: Path, config: dict[str, Any]) -> Path:
    (directory / "generation_config.json").write_text(json.dumps(config))
    return directory


def test_the_model_s_file_gives_the_five_sampling_fields_and_a_length(tmp_path: Path) -> None:
    _with_generation_config(tmp_path, {**QWEN_LIKE, "eos_token_id": [1, 2], "max_new_tokens": 9, "min_p": 0})
    defaults = sampling_defaults("auto", tmp_path)
    assert defaults == SamplingDefaults(
        temperature=0.7, top_p=0.8, top_k=20, min_p=0.0, repetition_penalty=1.05, max_new_tokens=9
    )
    assert defaults.describe() == (
        "temperature=0.7, top_p=0.8, top_k=20, min_p=0, repetition_penalty=1.05, max_new_tokens=9"
    )
    params = defaults.params()
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    # No length of their own: the input processor applies the model's where a request sets none.
    assert params.max_tokens is None
    assert SamplingDefaults(temperature=0.7).params().max_tokens == 16  # SamplingParams' own default
    assert sampling_defaults("none", tmp_path) == SamplingDefaults()


def test_vllm_s_name_for_no_defaults_is_taken(tmp_path: Path) -> None:
    # vLLM's start-up warning tells users to pass --generation-config vllm to turn the defaults off.
    _with_generation_config(tmp_path, QWEN_LIKE)
    check_generation_config("vllm")
    assert sampling_defaults("vllm", tmp_path) == SamplingDefaults()


def test_no_file_or_no_sampling_fields_give_no_defaults(tmp_path: Path) -> None:
    assert sampling_defaults("auto", tmp_path) == SamplingDefaults()
    _with_generation_config(tmp_path, {"bos_token_id": 1, "eos_token_id": 2})
    assert sampling_defaults("auto", tmp_path).given() == {}


def test_a_value_that_is_no_valid_default_is_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = {"temperature": "hot", "top_p": 0, "top_k": 2.5, "min_p": 0.1, "repetition_penalty": True}
    _with_generation_config(tmp_path, {**config, "max_new_tokens": 0})
    with caplog.at_level(logging.WARNING, logger="batchlm.sampling_defaults"):
        assert sampling_defaults("auto", tmp_path) == SamplingDefaults(min_p=0.1)
    warned = caplog.text
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"):
        assert f"{name} left out" in warned
    _with_generation_config(tmp_path, {"max_new_tokens": 12.5})
    assert sampling_defaults("auto", tmp_path) == SamplingDefaults()
    # A whole number written as a float is an integer top_k.
    _with_generation_config(tmp_path, {"top_k": 40.0})
    assert sampling_defaults("auto", tmp_path).top_k == 40


def test_another_directory_or_a_bad_file_is_named(tmp_path: Path) -> None:
    other = (
        _with_generation_config(tmp_path / "other", {"temperature": 0.3})
        if (tmp_path / "other").mkdir() is None
        else None
    )
    assert other is not None
    assert sampling_defaults(str(other), tmp_path) == SamplingDefaults(temperature=0.3)
    with pytest.raises(ValueError, match="--generation-config must be 'auto', 'none' or a directory"):
        sampling_defaults(str(tmp_path / "missing"), tmp_path)
    # Refused before a model loads.
    with pytest.raises(ValueError, match="is not a directory"):
        LLM(model="no-such-model", generation_config=str(tmp_path / "missing"))
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config\.json is not valid JSON"):
        sampling_defaults("auto", tmp_path)


def test_a_gguf_file_s_sampling_metadata_becomes_the_defaults(tmp_path: Path) -> None:
    sampling = {"general.sampling.temp": 0.6, "general.sampling.top_k": 30, "general.sampling.min_p": 0.05}
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", metadata=sampling)
    defaults = sampling_defaults("auto", prepare_gguf_model_dir(gguf_path, tmp_path / "cache"))
    assert defaults.top_k == 30 and defaults.top_p is None
    assert defaults.temperature == pytest.approx(0.6) and defaults.min_p == pytest.approx(0.05)


def test_llm_samples_with_the_model_s_values_unless_given_params(
    tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = _with_generation_config(
        Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "model")), {**QWEN_LIKE, "eos_token_id": 2}
    )
    llm = LLM(model=str(model_dir), device="cpu")
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    plain = LLM(model=str(model_dir), device="cpu", generation_config="none").get_default_sampling_params()
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (1.0, 1.0, 0, 1.0)


def test_the_model_s_length_serves_requests_that_set_none(
    tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    # As transformers' generate: max_new_tokens where the request sets no length, cut to the room the
    # context leaves (not refused); a request's own max_tokens wins.
    model_dir = _with_generation_config(
        Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "model")), {"max_new_tokens": 9}
    )
    llm = LLM(model=str(model_dir), device="cpu", max_model_len=64)
    unset = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=None)

    def lengths(prompt_len: int, params: SamplingParams) -> int:
        prompt = {"prompt_token_ids": [5 + i % 50 for i in range(prompt_len)]}
        return len(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids)

    assert lengths(8, unset) == 9
    # generate() without SamplingParams takes the model's length too, as vLLM's LLM does (not 16).
    default = llm.input_processor.process([5, 6, 7], llm.get_default_sampling_params())
    assert default.params.max_tokens == 9
    assert len(llm.generate("Once upon", use_tqdm=False)[0].outputs[0].token_ids) <= 9
    assert lengths(60, unset) == 4
    assert lengths(8, unset.clone(max_tokens=12)) == 12
    plain = LLM(model=str(model_dir), device="cpu", max_model_len=64, generation_config="none")
    prompt = {"prompt_token_ids": [5 + i for i in range(8)]}
    assert len(plain.generate(prompt, unset, use_tqdm=False)[0].outputs[0].token_ids) == 56


def test_the_served_model_carries_the_defaults(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = _with_generation_config(
        Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "model")),
        {"temperature": 0.4, "max_new_tokens": 7},
    )

    async def served(generation_config: str) -> tuple[SamplingDefaults, int | None]:
        config = EngineConfig(model=str(model_dir), device="cpu", generation_config=generation_config)
        engine = AsyncLLMEngine(config, multiprocess=False)
        await engine.start()
        try:
            # What the HTTP front end's validation makes of a 3-token prompt that sets no length.
            request = engine.input_processor.process([5, 6, 7], SamplingParams(max_tokens=None))
            room = engine.model_info.facts.max_model_len - 3
            length = request.params.max_tokens
            return engine.model_info.sampling_defaults, None if length == room else length
        finally:
            await engine.shutdown()

    assert asyncio.run(served("auto")) == (SamplingDefaults(temperature=0.4, max_new_tokens=7), 7)
    assert asyncio.run(served("none")) == (SamplingDefaults(), None)  # all the room the context leaves


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    engine = FakeEngine(max_model_len=1024)
    defaults = SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20)
    engine.model_info = dataclasses.replace(engine.model_info, sampling_defaults=defaults)
    return engine


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/responses", {"input": "hi"}),
    ],
)
def test_every_endpoint_fills_what_the_request_leaves_out(
    server: BackgroundServer, engine: FakeEngine, path: str, body: dict[str, Any]
) -> None:
    url = f"{server.base_url}{path}"
    assert httpx.post(url, json={"model": "fake-model", **body}, timeout=30).status_code == 200
    params = engine.calls[-1].params
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 20)
    given = {"temperature": 0.0, "top_p": 0.5}
    assert httpx.post(url, json={"model": "fake-model", **body, **given}, timeout=30).status_code == 200
    params = engine.calls[-1].params
    assert (params.temperature, params.top_p, params.top_k) == (0.0, 0.5, 20)
