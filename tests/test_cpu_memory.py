"""What stays resident on a CPU server: the API process reads a GGUF file's metadata without loading
torch, and the engine hands the heap's freed load-time memory back (runner/heap.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.runner import heap
from gguf_builder import write_tiny_gguf


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True, timeout=300
    )
    return result.stdout.strip().splitlines()[-1]


def test_finding_a_prepared_gguf_model_dir_does_not_load_torch(tmp_path: Path) -> None:
    # The first preparation writes the tokenizer through transformers (which loads torch); every
    # later start, the API server's included, only reads the file's metadata.
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "Q8_0")
    prepare_gguf_model_dir(gguf, tmp_path / "cache")
    loaded = _run(
        f"""
        import sys
        from pathlib import Path
        from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
        prepare_gguf_model_dir(Path({str(gguf)!r}), Path({str(tmp_path / "cache")!r}))
        print("torch" in sys.modules)
        """
    )
    assert loaded == "False"


@pytest.mark.skipif(heap._malloc_trim() is None, reason="this C library has no malloc_trim")
def test_trim_heap_returns_freed_memory() -> None:
    # 640 blocks of 100 kB (under glibc's mmap threshold, so from the heap), all freed but the last,
    # which keeps the heap's top in use: only trimming gives the 64 MB back.
    freed_mib = _run(
        """
        from batchlm.runner.heap import trim_heap

        def resident_kib():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

        blocks = [bytearray(100_000) for _ in range(640)]
        last = blocks.pop()
        del blocks
        before = resident_kib()
        trim_heap()
        print((before - resident_kib()) / 1024)
        """
    )
    assert float(freed_mib) >= 48
