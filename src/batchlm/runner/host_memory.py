"""How much memory this process can still take: the kernel's estimate, and a container's limit."""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as a huge number rather than "max".
_UNLIMITED = 1 << 60


def available_host_bytes() -> int | None:
    """Memory new allocations can take without swapping: Linux's MemAvailable, or less when this
    process's cgroup (a container's memory limit) leaves less room; None where neither is known."""
    rooms = (_mem_available(), cgroup_room(Path("/proc/self/cgroup"), CGROUP_ROOT))
    known = [room for room in rooms if room is not None]
    return min(known) if known else None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_room(membership: Path, root: Path) -> int | None:
    """The least room under a memory limit of this process's cgroup or any cgroup above it: the limit
    less the memory charged to it, page cache excepted (reclaimable). None without a limit."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    rooms: list[int] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2
            files = ("memory.max", "memory.current", "file")
            base = root
        elif "memory" in controllers.split(","):  # cgroup v1
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")
            base = root / "memory"
        else:
            continue
        directory = base / path.lstrip("/")
        while True:
            room = _room_in(directory, *files)
            if room is not None:
                rooms.append(room)
            if directory == base or base not in directory.parents:
                break
            directory = directory.parent
    return min(rooms) if rooms else None


def _room_in(directory: Path, limit_file: str, usage_file: str, cache_key: str) -> int | None:
    try:
        limit_text = (directory / limit_file).read_text().strip()
        if limit_text == "max" or int(limit_text) >= _UNLIMITED:
            return None
        usage = int((directory / usage_file).read_text())
        cache = 0
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key:
                cache = int(value)
        return max(0, int(limit_text) - (usage - cache))
    except (OSError, ValueError):
        return None
