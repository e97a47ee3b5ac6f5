"""README.md's lists of GGUF tensor types are the ones models/gguf_types.py loads: all of them, and
those kept quantized on the CPU kernels (every kernel type but Q6_K, which becomes Q8_0 blocks)."""

from __future__ import annotations

import re
from pathlib import Path

from batchlm.models.gguf_types import KERNEL_TYPES, SUPPORTED_TYPES

README = Path(__file__).resolve().parents[1] / "README.md"
_TYPE = re.compile(r"\b(?:[QF]\d+(?:_[0-9K])?|BF16|IQ\d_[A-Z]+|TQ\d_0|MXFP4)\b")
KEPT = KERNEL_TYPES - {"Q6_K"}


def _types_in(text: str) -> set[str]:
    return set(_TYPE.findall(text))


def _between(start: str, end: str) -> str:
    text = " ".join(README.read_text(encoding="utf-8").split())
    return text.split(start, 1)[1].split(end, 1)[0]


def test_the_types_it_loads() -> None:
    listed = _between("architectures, with F32", "(the list is")
    # "(what IQ2_M, IQ3_M, IQ4_XS, ... files hold)": llama.cpp's file types, not tensor types.
    listed = re.sub(r"what [^)]* files hold", "", listed)
    assert _types_in(listed) | {"F32"} == SUPPORTED_TYPES


def test_the_types_kept_quantized_on_cpus() -> None:
    assert _types_in(_between("other llama.cpp types, with", "weights kept quantized")) == KEPT
    assert _types_in(_between("GGUF files with Q8_0", "weights stay quantized")) | {"Q8_0"} == KEPT
