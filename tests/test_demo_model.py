"""Tests for the built-in demo model: deterministic, loadable by transformers, safe to build concurrently."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchlm.models.demo import (
    DEMO_CONFIG,
    DEMO_MODEL_NAME,
    DEMO_VERSION,
    GENERATION_EOS_IDS,
    ensure_demo_model,
    write_model_dir,
)
from batchlm.tokenizer.tokenizer import Tokenizer

# Waits for a "go" file so that both processes call ensure_demo_model at the same moment.
RACER = """
import sys, time
from pathlib import Path
from batchlm.models.demo import ensure_demo_model
ready, go, cache = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.01)
print(ensure_demo_model(cache))
"""


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_name_says_random_weights() -> None:
    assert DEMO_MODEL_NAME == "batchlm-demo-random-weights"


def test_build_is_deterministic(tmp_path: Path, demo_model_dir: Path) -> None:
    rebuilt = ensure_demo_model(tmp_path)
    assert rebuilt == tmp_path / DEMO_VERSION != demo_model_dir
    assert file_bytes(rebuilt) == file_bytes(demo_model_dir)
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= set(file_bytes(rebuilt))


def test_loads_with_transformers(demo_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    hf_tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers) == (256, 4)
    assert (config.num_attention_heads, config.num_key_value_heads) == (8, 2)
    assert config.max_position_embeddings == 2048
    assert config.vocab_size == len(hf_tokenizer) == DEMO_CONFIG["vocab_size"] >= 1024
    ids = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True
    )
    with torch.no_grad():
        logits = model(torch.tensor([ids["input_ids"]])).logits
    assert logits.shape == (1, len(ids["input_ids"]), config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0  # random, but not degenerate


def test_generation_config_and_tokenizer(demo_model_dir: Path) -> None:
    generation = json.loads((demo_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == GENERATION_EOS_IDS == [1, 3]
    tokenizer = Tokenizer.from_pretrained(demo_model_dir)
    assert tokenizer.eos_token_ids == (1, 3)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])[:2] == [0, 2]


def test_cached_build_is_reused_and_warns(demo_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = (demo_model_dir / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="batchlm.models.demo"):
        assert ensure_demo_model(demo_model_dir.parent) == demo_model_dir
    assert (demo_model_dir / "model.safetensors").stat().st_mtime_ns == before
    assert any("RANDOM weights" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_default_location_follows_batchlm_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHLM_CACHE", str(tmp_path / "custom"))
    assert ensure_demo_model() == tmp_path / "custom" / DEMO_VERSION
    assert (tmp_path / "custom" / DEMO_VERSION / "config.json").is_file()


def test_incomplete_cache_entry_is_rebuilt(tmp_path: Path, demo_model_dir: Path) -> None:
    broken = tmp_path / DEMO_VERSION
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert ensure_demo_model(tmp_path) == broken
    assert file_bytes(broken) == file_bytes(demo_model_dir)
    # No staging or discarded dirs left; beside it, the lock file processes using the version hold.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{DEMO_VERSION}.lock", DEMO_VERSION]


def test_concurrent_first_use_is_safe(tmp_path: Path, demo_model_dir: Path) -> None:
    cache, go = tmp_path / "cache", tmp_path / "go"
    readies = [tmp_path / f"ready{i}" for i in range(2)]
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(ready), str(go), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ready in readies
    ]
    while not all(r.exists() for r in readies) and all(p.poll() is None for p in racers):
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=300) for p in racers]
    for racer, (stdout, stderr) in zip(racers, results, strict=True):
        assert racer.returncode == 0, stderr
        assert Path(stdout.strip()) == cache / DEMO_VERSION
        assert "RANDOM weights" in stderr
    assert file_bytes(cache / DEMO_VERSION) == file_bytes(demo_model_dir)
    assert sorted(p.name for p in cache.iterdir()) == [f".{DEMO_VERSION}.lock", DEMO_VERSION]


def test_write_model_dir_vocab_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        write_model_dir(tmp_path / "small", overrides={"vocab_size": 1000})
    padded = write_model_dir(tmp_path / "padded", overrides={"vocab_size": 2176})
    assert json.loads((padded / "config.json").read_text())["vocab_size"] == 2176
    assert Tokenizer.from_pretrained(padded).vocab_size == DEMO_CONFIG["vocab_size"]
