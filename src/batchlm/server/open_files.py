"""The open-file limit of `batchlm serve`: every client connection holds a file descriptor."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# The soft limit sought where the hard limit is unlimited (some systems refuse "unlimited" itself).
UNLIMITED_HARD_TARGET = 65536


def raise_open_file_limit() -> int | None:
    """Raise this process's soft limit on open files to its hard limit (processes it starts inherit
    it); returns the soft limit in force afterwards (None on a system without one).

    Many systems start processes with a soft limit of 1024 while they allow far more. Past it, a
    server with hundreds of concurrent streams drops new connections unanswered (the event loop
    accepts and closes them, logging nothing), and a file it opens mid-request fails with a 500."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_HARD_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        logger.warning(
            "could not raise the open-file limit from %d to %d (%s): the server holds at most about %d "
            "connections at once",
            soft,
            target,
            error,
            soft,
        )
        return soft
    logger.debug("open-file limit raised from %d to %d", soft, target)
    return target


# File descriptors kept for what is not a client connection (the listener, the engine's pipes, the
# stored responses' database, logs): at least this many, or an eighth of the limit.
RESERVED_FILES = 64


def connection_limit() -> int | None:
    """The client connections this process can hold while files still open: its open-file limit less
    a reserve (None on a system without such a limit, or without one)."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, soft - max(RESERVED_FILES, soft // 8))
