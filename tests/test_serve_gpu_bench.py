"""benchmarks/serve_gpu.py's model directory: every id the random model can sample decodes to text
(an id past the tokenizer's vocabulary streamed nothing and the bench counted the request as failed)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def serve_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    import serve_gpu

    yield serve_gpu
    sys.modules.pop("serve_gpu", None)


def test_every_model_id_decodes_to_text(serve_gpu) -> None:  # type: ignore[no-untyped-def]
    from model_shapes import SHAPES
    from tokenizers import Tokenizer

    model_dir = serve_gpu.prepare_model_dir("smollm2-135m")
    vocab_size = SHAPES["smollm2-135m"]["vocab_size"]
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == vocab_size
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == vocab_size
    special = {0, 1, 2, 3}  # BOS, EOS and the chat markers: skipped when decoding, as the server does
    empty = [i for i in range(vocab_size) if i not in special and tokenizer.decode([i]) == ""]
    assert empty == []


def test_prepare_model_dir_is_idempotent(serve_gpu) -> None:  # type: ignore[no-untyped-def]
    first = serve_gpu.prepare_model_dir("tiny")
    tokenizer_text = (first / "tokenizer.json").read_text()
    second = serve_gpu.prepare_model_dir("tiny")
    assert second == first
    assert (second / "tokenizer.json").read_text() == tokenizer_text
