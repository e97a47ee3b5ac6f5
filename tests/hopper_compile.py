"""Compiling a Triton kernel for Hopper (sm_90) on any machine, for the compile tests
(test_kernels_compile_hopper.py, test_attention_compile_hopper.py): Triton compiles ahead of time for
a named target with the ptxas it ships, no GPU needed.
"""

from __future__ import annotations

from typing import Any

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
# Shared memory per block on an H100/H200 (227 KiB).
HOPPER_SHARED = 232448


def compile_for_hopper(
    kernel: Any,
    types: dict[str, str],
    constants: dict[str, Any],
    aligned: bool = False,
    target: GPUTarget = HOPPER,
    **options: Any,
) -> Any:
    """Compile `kernel` with every non-constexpr argument typed by `types` (default i32); `aligned`:
    every pointer and integer argument specialised as divisible by 16, as a launch on whole rows of
    a real layer's weights is. A constexpr with a default (a variant such as SINKS) takes it unless
    `constants` names it, as a launch that leaves it out does."""
    names = kernel.arg_names
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
    constants = defaults | constants
    signature = {n: ("constexpr" if n in constants else types.get(n, "i32")) for n in names}
    constexprs = {(names.index(n),): v for n, v in constants.items()}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if aligned and n not in constants}
    try:
        source = ASTSource(kernel, signature, constexprs, attrs)
        compiled = triton.compile(source, target=target, options=options)
    except RuntimeError as exc:  # pragma: no cover - depends on the install
        if "ptxas" in str(exc) and "not found" in str(exc):
            pytest.skip(f"no ptxas here: {exc}")
        raise
    assert compiled.metadata.shared <= HOPPER_SHARED
    return compiled


def memory_lines(ptx: str) -> list[str]:
    return [
        line.strip()
        for line in ptx.splitlines()
        if "ld.global" in line or "st.global" in line or "griddep" in line
    ]
