"""Our float32 CPU kernels (cpu_kernels.c: the packed-weight GEMM, paged decode attention, sampling) for
x86-64 CPUs with AVX2 and FMA, compiled once per machine and loaded through ctypes.

The library is compiled with the machine's C compiler (`$CC`, else cc, gcc or clang) into the batchlm
cache (`config.cache_root()`) the first time it is needed, about a second; a CPU engine builds it and
the other kernel libraries side by side before its model loads (`build_libraries`). Without a
compiler, AVX2/FMA or OpenMP, or with BATCHLM_CPU_KERNELS=0 (or false/off/no), `native_library()` is
None (logged once) and callers keep torch's ops. Each function is probed against torch before use.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from batchlm.config import cache_root, current_umask, is_unwritable
from batchlm.temp_dirs import KERNELS_PREFIX, make_temp_dir, remove_temp_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
PANEL = 16  # output columns per packed GEMM panel; must match PANEL in cpu_kernels.c
DISABLE_ENV = "BATCHLM_CPU_KERNELS"
# F16C (half <-> float32) comes with every AVX2 CPU.
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120.0
# Age past which a compile's partial output belongs to no running build (each is killed at
# COMPILE_TIMEOUT_S), only to one whose process ended first: a server stopped during its first start
# leaves them, its compiler finishing alone after it.
STALE_PARTIAL_S = 5 * COMPILE_TIMEOUT_S
PARTIAL_SUFFIX = ".so.partial"
# The kernel directories this process swept of such outputs (once each; under _PRIVATE_DIRS_LOCK).
_SWEPT: set[Path] = set()
_PRIVATE_DIRS: dict[Path, Path] = {}
_PRIVATE_DIRS_LOCK = threading.Lock()
# Rows from which a row-parallel pass (the cache write, RoPE) takes every thread.
MIN_PARALLEL_ROWS = 64


def cpu_supports_kernel() -> bool:
    """x86-64 with AVX2 (which torch's CPU dispatch reports only alongside FMA)."""
    capability = str(torch.backends.cpu.get_cpu_capability())
    return capability.startswith("AVX2") or capability.startswith("AVX512")


def threads_for_rows(rows: int) -> int:
    """Threads for a pass over `rows` independent rows: all of torch's, or one below MIN_PARALLEL_ROWS
    (a decode step's rows), where waking the others costs more than they save."""
    return torch.get_num_threads() if rows >= MIN_PARALLEL_ROWS else 1


def pointer_of(tensor: torch.Tensor | None) -> int | None:
    """A tensor's data address for a kernel's argument, NULL for none."""
    return None if tensor is None else tensor.data_ptr()


def disabled_by_environment() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "false", "off", "no")


def kernels_wanted() -> bool:
    """Whether the kernels are to be built here: not turned off, and a CPU they run on."""
    return not disabled_by_environment() and cpu_supports_kernel()


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The compiled and loaded kernel library, or None where it cannot be used (logged once). Callers
    probe the function they use (`probed`) before trusting it."""
    if disabled_by_environment():
        logger.info("CPU kernels disabled by %s; using torch's ops", DISABLE_ENV)
        return None
    if not cpu_supports_kernel():
        logger.info(
            "CPU kernels need AVX2/FMA (this CPU: %s); using torch's ops",
            torch.backends.cpu.get_cpu_capability(),
        )
        return None
    try:
        path = KERNELS.build()
        try:
            return _load(path)
        except OSError:
            # A damaged cache entry (a crash or a full disk while it was written): build it once more.
            path.unlink(missing_ok=True)
            return _load(KERNELS.build())
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("CPU kernels unavailable (%s); using torch's slower ops", error)
        return None


def probed(name: str, agrees: Callable[[ctypes.CDLL], bool]) -> ctypes.CDLL | None:
    """native_library() if `agrees(library)` (a small case checked against torch), else None with a
    warning: a miscompile or a wrong CPU path must never reach a model."""
    library = native_library()
    if library is None:
        return None
    if not agrees(library):
        logger.warning("CPU kernel %s disagrees with torch on a probe; using torch's ops", name)
        return None
    return library


@dataclass(frozen=True)
class LibrarySource:
    """One kernel library: its C file, compile flags and the files it #includes."""

    path: Path
    flags: tuple[str, ...] = COMPILE_FLAGS
    includes: tuple[Path, ...] = ()

    def build(self, cache_dir: Path | None = None) -> Path:
        return build_library(cache_dir, self.path, self.flags, self.includes)


KERNELS = LibrarySource(SOURCE)


def build_libraries(sources: Sequence[LibrarySource]) -> None:
    """Build the libraries not yet in the cache side by side (one compiler process each), where the
    first start would otherwise compile them one after another as loading reaches each. A failure is
    left for that library's own loader to report when it builds it again."""
    if not kernels_wanted():
        return
    with ThreadPoolExecutor(max_workers=len(sources)) as pool:
        for future in [pool.submit(source.build) for source in sources]:
            with contextlib.suppress(OSError, RuntimeError, subprocess.SubprocessError):
                future.result()


def build_library(
    cache_dir: Path | None = None,
    source_path: Path = SOURCE,
    flags: tuple[str, ...] = COMPILE_FLAGS,
    includes: tuple[Path, ...] = (),
) -> Path:
    """A kernels' shared library (cpu_kernels.c unless told) in the cache, compiled there first if
    missing; raises RuntimeError when no compiler is found or the compile fails. `includes`: the
    files the source #includes, so that a change to them builds a new library too."""
    compiler = _compiler()
    sources = [source_path.read_bytes(), *(path.read_bytes() for path in includes)]
    key = hashlib.sha256(b"\0".join([*sources, compiler.encode(), " ".join(flags).encode()])).hexdigest()
    directory = (cache_dir or cache_root()) / "kernels"
    name = f"{source_path.stem}-{key[:16]}.so"
    with _PRIVATE_DIRS_LOCK:
        if directory not in _SWEPT:
            _SWEPT.add(directory)
            remove_stale_partials(directory, time.time())
    # One this user cannot read (built private by an older version, as another user) is built again.
    if os.access(directory / name, os.R_OK):
        return directory / name
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return _compile(compiler, source_path, flags, directory / name)
    except OSError as error:
        if not is_unwritable(error):
            raise
        # A read-only cache (a container's, another user's) still gets the kernels, built for this
        # process only: torch's ops instead are several times slower, and GGUF weights would be
        # dequantized to float32.
        private = _private_build_dir(directory, error)
        if (private / name).exists():
            return private / name
        return _compile(compiler, source_path, flags, private / name)


def remove_stale_partials(directory: Path, now: float) -> None:
    """Remove the partial outputs of compiles that ended with their process, older than
    STALE_PARTIAL_S at `now` (a live compile's is younger)."""
    try:
        partials = list(directory.glob(f"*{PARTIAL_SUFFIX}"))
    except OSError:
        return
    for partial in partials:
        try:
            if now - partial.stat().st_mtime > STALE_PARTIAL_S:
                partial.unlink()
                logger.info("removed %s, left by a compile that was cut short", partial)
        except OSError:  # removed by another process meanwhile, or a cache we cannot write
            continue


def _compile(compiler: str, source_path: Path, flags: tuple[str, ...], target: Path) -> Path:
    # Compile beside the target and rename: processes starting together never load a half-written file.
    handle, partial = tempfile.mkstemp(
        prefix=f"{source_path.stem}-", suffix=PARTIAL_SUFFIX, dir=target.parent
    )
    os.close(handle)
    try:
        command = [compiler, *flags, str(source_path), "-o", partial]
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
        # mkstemp made the file private: another user sharing the cache could not load it. The mode a
        # linker gives a library it creates instead.
        os.chmod(partial, 0o777 & ~current_umask())
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info("Built the CPU kernels: %s", target)
    return target


def _private_build_dir(unwritable: Path, error: OSError) -> Path:
    """A directory of this process's own (mode 0700, so no other user can place a library there),
    removed at exit: a loaded library needs its file no longer. One per process (the libraries build
    on several threads at once), said once."""
    with _PRIVATE_DIRS_LOCK:
        if unwritable not in _PRIVATE_DIRS:
            directory = make_temp_dir(KERNELS_PREFIX)
            atexit.register(remove_temp_dir, directory)
            logger.warning(
                "cannot write the kernel cache %s (%s); building the CPU kernels in %s for this process",
                unwritable,
                error,
                directory,
            )
            _PRIVATE_DIRS[unwritable] = directory
        return _PRIVATE_DIRS[unwritable]


def _compiler() -> str:
    for candidate in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        path = shutil.which(candidate) if candidate else None
        if path:
            return path
    raise RuntimeError("no C compiler found (set CC, or install gcc)")


def _load(path: Path) -> ctypes.CDLL:
    # torch is imported above, so its libgomp is loaded: the library binds to it by soname and shares
    # torch's OpenMP threads rather than starting a second pool that would fight them for the cores.
    library = ctypes.CDLL(str(path))
    function = library.batchlm_gemm_f32
    size = ctypes.c_long
    function.argtypes = [
        ctypes.c_void_p, size,  # x, its row stride
        ctypes.c_void_p, size, size,  # packed panels, their k stride, panel stride
        ctypes.c_void_p,  # bias or NULL
        ctypes.c_void_p, size,  # out, its row stride
        size, size, size,  # M, N, K
        ctypes.c_int,  # threads
    ]  # fmt: skip
    function.restype = None
    function = library.batchlm_paged_decode
    function.argtypes = [
        ctypes.c_void_p, size,  # q, its row stride
        ctypes.c_void_p, ctypes.c_void_p,  # key cache, value cache
        ctypes.c_void_p, size,  # block tables (int32), their row stride
        ctypes.c_void_p,  # seq_lens (int32)
        ctypes.c_void_p, size,  # out, its row stride
        size, size, size, size, size,  # B, heads, kv_heads, D, block_size
        ctypes.c_float, ctypes.c_int,  # scale, threads
        size, ctypes.c_float,  # sliding window (0: none), soft-cap (0: none)
        ctypes.c_void_p,  # sink logits (float32, one a head) or NULL
        ctypes.c_int,  # the caches hold half values (else float32)
    ]  # fmt: skip
    function.restype = ctypes.c_int
    function = library.batchlm_write_kv
    function.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p,  # key cache, value cache
        ctypes.c_void_p, size, ctypes.c_void_p, size,  # keys, their row stride, values, their row stride
        ctypes.c_void_p, size, size,  # slots (int64), tokens, elements a token (KV heads x head dim)
        size, ctypes.c_int, ctypes.c_int,  # slots a cache holds, half values (else float32), threads
    ]  # fmt: skip
    function.restype = size  # slots past the caches (not written)
    function = library.batchlm_rope
    function.argtypes = [
        ctypes.c_void_p, size, ctypes.c_void_p, size,  # x, its token stride, out, its token stride
        ctypes.c_void_p, size, size, ctypes.c_void_p,  # cos | sin table, its rows, row stride, positions
        size, size, size, ctypes.c_int,  # tokens, heads, head dim, threads
    ]  # fmt: skip
    function.restype = size  # positions past the table (their tokens not written)
    function = library.batchlm_sample_f32
    function.argtypes = [
        ctypes.c_void_p, size, size, size,  # logits, their row stride, B, V
        ctypes.c_void_p, ctypes.c_void_p,  # temperature (float32), uniforms (float64)
        ctypes.c_void_p, ctypes.c_int,  # out (int64), threads
    ]  # fmt: skip
    function.restype = ctypes.c_int
    return library
