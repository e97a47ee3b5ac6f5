"""A CPU engine's kernel libraries, compiled together before the model loads: into the cache
entries each library's own loader then finds, so nothing compiles twice."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from batchlm.kernels import cpu_native
from batchlm.kernels.cpu_decode_stack import STACK_KERNELS
from batchlm.kernels.cpu_native import KERNELS
from batchlm.kernels.cpu_quant import QUANT_KERNELS
from batchlm.runner.cpu_kernel_builds import build_cpu_kernels

needs_kernel = pytest.mark.skipif(not cpu_native.kernels_wanted(), reason="no AVX2 CPU here")


def counting_compiles(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    compiles: list[list[str]] = []
    run = subprocess.run

    def counted(command: list[str], *args: Any, **kwargs: Any) -> Any:
        compiles.append(command)
        return run(command, *args, **kwargs)

    monkeypatch.setattr(cpu_native.subprocess, "run", counted)
    return compiles


@needs_kernel
def test_every_library_is_built_once_into_its_loaders_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHLM_CACHE", str(tmp_path))
    compiles = counting_compiles(monkeypatch)
    build_cpu_kernels()
    assert sorted(Path(command[-3]).name for command in compiles) == sorted(
        source.path.name for source in (KERNELS, QUANT_KERNELS, STACK_KERNELS)
    )
    built = {path.name for path in (tmp_path / "kernels").iterdir()}
    assert len(built) == 3 and not any(name.endswith(".partial") for name in built)
    # What each loader asks for is there: no compile the second time.
    assert {source.build().name for source in (KERNELS, QUANT_KERNELS, STACK_KERNELS)} == built
    build_cpu_kernels()
    assert len(compiles) == 3


@pytest.mark.parametrize("value", ["0", "off"])
def test_nothing_is_built_with_the_kernels_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("BATCHLM_CACHE", str(tmp_path))
    monkeypatch.setenv(cpu_native.DISABLE_ENV, value)
    compiles = counting_compiles(monkeypatch)
    build_cpu_kernels()
    assert compiles == [] and not (tmp_path / "kernels").exists()


def test_a_failed_compile_is_left_to_the_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_native, "cpu_supports_kernel", lambda: True)
    monkeypatch.setenv("BATCHLM_CACHE", str(tmp_path))
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'error: unsupported flag' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    build_cpu_kernels()  # does not raise: each library's loader reports its own failure
    assert not list((tmp_path / "kernels").glob("*.so"))


def test_a_read_only_cache_still_gets_the_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Without them a read-only cache silently ran torch's ops (GGUF weights dequantized to float32).
    monkeypatch.setenv("BATCHLM_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fakecc"
    fake.write_text('#!/bin/sh\nfor last; do :; done\necho built > "$last"\n')  # writes its -o file
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    unwritable = tmp_path / "cache" / "kernels"
    mkstemp = cpu_native.tempfile.mkstemp

    def read_only(*args: Any, **kwargs: Any) -> Any:
        if Path(kwargs["dir"]) == unwritable:
            raise OSError(errno.EROFS, "Read-only file system", str(unwritable))
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr(cpu_native.tempfile, "mkstemp", read_only)
    with caplog.at_level(logging.WARNING):
        first, second = KERNELS.build(), QUANT_KERNELS.build()
    assert first.read_text() == "built\n" and second.read_text() == "built\n"
    assert first.parent == second.parent != unwritable  # one private directory for the process
    assert first.parent.stat().st_mode & 0o077 == 0
    assert caplog.text.count("cannot write the kernel cache") == 1
    assert KERNELS.build() == first  # built once


def test_a_built_library_is_loadable_by_other_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It was compiled into a mkstemp file (0o600), which the linker left 0o711: another user sharing
    # the cache could not load it and silently ran torch's ops.
    from batchlm.config import current_umask

    monkeypatch.setenv("BATCHLM_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fakecc"
    fake.write_text('#!/bin/sh\nfor last; do :; done\necho built > "$last"\n')  # keeps the file's mode
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    built = cpu_native.build_library()
    assert built.parent == tmp_path / "cache" / "kernels"
    assert built.stat().st_mode & 0o777 == 0o777 & ~current_umask()


def test_partial_outputs_of_compiles_cut_short_are_removed_once_stale(tmp_path: Path) -> None:
    """A server stopped during its first start leaves its compiler's output under the partial name;
    one younger than any compile may take is a live build's, and stays."""
    stale, live = tmp_path / "cpu_kernels-abc.so.partial", tmp_path / "cpu_kernels-def.so.partial"
    library = tmp_path / "cpu_kernels-0123456789abcdef.so"
    for path in (stale, live, library):
        path.write_bytes(b"\x7fELF")
    built_at = live.stat().st_mtime
    os.utime(stale, (built_at - cpu_native.STALE_PARTIAL_S - 1,) * 2)
    cpu_native.remove_stale_partials(tmp_path, now=built_at + cpu_native.COMPILE_TIMEOUT_S)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, library.name])
    cpu_native.remove_stale_partials(tmp_path, now=built_at + cpu_native.STALE_PARTIAL_S + 1)
    assert [p.name for p in tmp_path.iterdir()] == [library.name]


@needs_kernel
def test_a_start_sweeps_what_an_interrupted_one_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_native, "_SWEPT", set())
    left = tmp_path / "kernels" / "cpu_kernels-abc.so.partial"
    left.parent.mkdir()
    left.write_bytes(b"\x7fELF")
    os.utime(left, (left.stat().st_mtime - cpu_native.STALE_PARTIAL_S - 60,) * 2)
    KERNELS.build(tmp_path)
    assert not left.exists()
