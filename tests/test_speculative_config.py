"""Speculative decoding settings: flags, device defaults, validation, and the /metrics counters."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from batchlm.config import EngineConfig
from batchlm.core.speculation import SpeculationConfig
from batchlm.engine.client import EngineStats
from batchlm.executor.core_builder import (
    SPECULATIVE_MAX_BATCH,
    SPECULATIVE_POOL_TOKENS,
    build_engine_core,
    resolve_speculation,
)
from batchlm.flags import add_engine_arguments, dataclass_from_args
from batchlm.server.metrics import EngineStatsCollector


def test_defaults_follow_the_device() -> None:
    config = EngineConfig()
    assert config.speculative == "auto"
    cpu, gpu = resolve_speculation(config, "cpu"), resolve_speculation(config, "cuda:0")
    assert (cpu.mode, cpu.max_batch, cpu.num_tokens) == ("auto", SPECULATIVE_MAX_BATCH["cpu"], 7)
    assert (gpu.mode, gpu.max_batch, gpu.num_tokens) == ("auto", SPECULATIVE_MAX_BATCH["cuda"], 4)
    chosen = resolve_speculation(
        config.with_updates(speculative_max_batch=7, num_speculative_tokens=6), "cpu"
    )
    assert (chosen.max_batch, chosen.num_tokens) == (7, 6)


def test_the_n_gram_pool_is_on_for_the_cpu_and_can_be_set() -> None:
    config = EngineConfig()
    assert resolve_speculation(config, "cpu").pool_tokens == SPECULATIVE_POOL_TOKENS["cpu"] > 0
    assert resolve_speculation(config, "cuda:0").pool_tokens == SPECULATIVE_POOL_TOKENS["cuda"] == 0
    assert resolve_speculation(config.with_updates(speculative_pool_tokens=0), "cpu").pool_tokens == 0
    assert resolve_speculation(config.with_updates(speculative_pool_tokens=99), "cuda").pool_tokens == 99
    with pytest.raises(ValueError, match="--speculative-pool-tokens"):
        resolve_speculation(config.with_updates(speculative_pool_tokens=-1), "cpu")
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    parsed = dataclass_from_args(EngineConfig, parser.parse_args(["--speculative-pool-tokens", "500"]))
    assert parsed.speculative_pool_tokens == 500


def test_most_verify_rows_bound_the_decode_graphs() -> None:
    """The rows of the largest verify step, which the GPU runner captures decode graphs for."""
    assert SpeculationConfig(mode="off", num_tokens=4).most_verify_rows(32) == 0
    assert SpeculationConfig(mode="ngram", num_tokens=4).most_verify_rows(32) == 160
    assert SpeculationConfig(mode="auto", num_tokens=4, max_batch=6).most_verify_rows(32) == 30
    assert SpeculationConfig(mode="auto", num_tokens=4, max_batch=64).most_verify_rows(32) == 160
    assert SpeculationConfig(mode="auto", num_tokens=4, max_batch=0).most_verify_rows(32) == 0


def test_off_under_tensor_parallelism_and_bad_values(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="batchlm.executor.core_builder"):
        resolve_speculation(EngineConfig(tensor_parallel_size=2), "cpu")
        assert "ignored" not in caplog.text  # "auto" makes no promise to break
        ngram = resolve_speculation(EngineConfig(speculative="ngram", tensor_parallel_size=2), "cpu")
    assert ngram.mode == "off"
    # Asked for by name and not done: the log says so.
    assert "--speculative ngram is ignored with --tensor-parallel-size 2" in caplog.text
    with pytest.raises(ValueError, match="--speculative"):
        resolve_speculation(EngineConfig(speculative="eagle"), "cpu")
    with pytest.raises(ValueError, match="--num-speculative-tokens"):
        resolve_speculation(EngineConfig(num_speculative_tokens=0), "cpu")


def test_speculation_tuned_by_name_under_tensor_parallelism_is_said_to_be_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under "auto", off with tensor parallelism by design, a tuning flag is still an explicit ask: it is
    said to be ignored, naming both flags; zeros, which turn a part off, ask for nothing."""
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--tensor-parallel-size", "2", "--num-speculative-tokens", "5"])
    with caplog.at_level(logging.WARNING, logger="batchlm.executor.core_builder"):
        tuned = resolve_speculation(dataclass_from_args(EngineConfig, args), "cpu")
    assert tuned.mode == "off"
    assert "--num-speculative-tokens 5 is ignored with --tensor-parallel-size 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="batchlm.executor.core_builder"):
        both = EngineConfig(tensor_parallel_size=2, speculative="ngram", speculative_pool_tokens=100)
        resolve_speculation(both, "cpu")
        assert "--speculative ngram, --speculative-pool-tokens 100 are ignored" in caplog.text
        caplog.clear()
        resolve_speculation(EngineConfig(tensor_parallel_size=2, speculative_max_batch=3), "cpu")
        assert "--speculative-max-batch 3 is ignored" in caplog.text
        caplog.clear()
        for quiet in (
            EngineConfig(tensor_parallel_size=2, speculative_max_batch=0, speculative_pool_tokens=0),
            EngineConfig(tensor_parallel_size=2, speculative="off"),
            EngineConfig(num_speculative_tokens=5),  # one device: not ignored
        ):
            resolve_speculation(quiet, "cpu")
        assert caplog.text == ""


def test_a_tuning_value_the_mode_ignores_is_said_to_be_ignored(caplog: pytest.LogCaptureFixture) -> None:
    # What the CLIs refuse among their flags, LLM(...) is told in the log, naming the flag.
    for config, flag in (
        (EngineConfig(speculative="off", num_speculative_tokens=3), "--num-speculative-tokens"),
        (EngineConfig(speculative="ngram", speculative_max_batch=2), "--speculative-max-batch"),
        (EngineConfig(speculative="off", speculative_pool_tokens=0), "--speculative-pool-tokens"),
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="batchlm.executor.core_builder"):
            resolve_speculation(config, "cpu")
        assert f"{flag} applies to --speculative " in caplog.text and caplog.text.rstrip().endswith("ignored")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="batchlm.executor.core_builder"):
        resolve_speculation(
            EngineConfig(speculative="ngram", num_speculative_tokens=3, speculative_pool_tokens=0), "cpu"
        )
    assert caplog.text == ""


def test_speculation_values_out_of_range_are_refused_before_the_model_loads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--num-speculative-tokens must be positive"):
        build_engine_core(EngineConfig(num_speculative_tokens=0), tmp_path / "no-model-here")


def test_flags() -> None:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--speculative", "ngram", "--num-speculative-tokens", "3"])
    config = dataclass_from_args(EngineConfig, args)
    assert (config.speculative, config.num_speculative_tokens) == ("ngram", 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative", "draft-model"])


class _Engine:
    is_ready = True
    is_dead = False

    def stats(self) -> EngineStats:
        return EngineStats(spec_proposed_tokens_total=40, spec_accepted_tokens_total=25, spec_drafts_total=10)


def test_metrics_expose_proposed_and_accepted_drafts() -> None:
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(_Engine()))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert "batchlm_spec_proposed_tokens_total 40.0" in text
    assert "batchlm_spec_accepted_tokens_total 25.0" in text
    assert "batchlm_spec_drafts_total 10.0" in text
