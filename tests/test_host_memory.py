"""The memory a CPU KV cache may take: Linux's MemAvailable, and the room under a cgroup's memory limit
(a container's), read from a fake cgroup tree here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from batchlm.runner.host_memory import available_host_bytes, cgroup_room

GIB = 1 << 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_the_memory_available_is_at_most_the_machine_s() -> None:
    available = available_host_bytes()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert available is not None and 0 < available <= total


def _cgroup(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def test_a_cgroup_v2_limit_above_the_process_leaves_its_room(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    membership = tmp_path / "cgroup"
    membership.write_text("0::/pod/container\n")
    _cgroup(
        root / "pod",
        {
            "memory.max": str(GIB),
            "memory.current": str(GIB // 2),
            "memory.stat": f"anon 1\nfile {GIB // 4}\n",
        },
    )
    _cgroup(root / "pod" / "container", {"memory.max": "max", "memory.current": "0", "memory.stat": ""})
    # The limit less what is charged to it, its page cache excepted: 1 GiB - (512 - 256) MiB.
    assert cgroup_room(membership, root) == GIB - GIB // 4


def test_a_cgroup_v1_limit_and_an_unlimited_one(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    membership = tmp_path / "cgroup"
    membership.write_text("7:cpu,cpuacct:/x\n4:memory:/job\n")
    stat = f"cache 1\ntotal_cache {GIB // 2}\n"
    _cgroup(
        root / "memory" / "job",
        {"memory.limit_in_bytes": str(2 * GIB), "memory.usage_in_bytes": str(GIB), "memory.stat": stat},
    )
    _cgroup(
        root / "memory",
        {"memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": "5", "memory.stat": ""},
    )
    assert cgroup_room(membership, root) == 2 * GIB - GIB // 2
    membership.write_text("4:memory:/\n")
    assert cgroup_room(membership, root) is None  # only the unlimited root
    assert cgroup_room(tmp_path / "missing", root) is None
    membership.write_text("not a cgroup line\n4:memory:/job\n")  # lines it cannot read are skipped
    assert cgroup_room(membership, root) == 2 * GIB - GIB // 2
