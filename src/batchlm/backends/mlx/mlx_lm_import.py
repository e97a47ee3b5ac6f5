"""Import mlx-lm without letting it lower the process's open-file limit.

mlx_lm.utils runs `resource.setrlimit(RLIMIT_NOFILE, (2048, 4096))` when imported (and `import mlx_lm`
imports it). In `batchlm serve`, which raised its soft limit to the hard limit before the backend loads,
that would cut the connections the server can hold to about 2048, and an unprivileged process can never
raise a lowered hard limit again (every process it starts inherits the cap)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def import_mlx_lm() -> None:
    """Import mlx_lm once, keeping the open-file limits no lower than they are (a no-op without it)."""
    try:
        if importlib.util.find_spec("mlx_lm") is None:
            return
    except ValueError:  # already imported, without a spec
        return
    with _open_file_limit_never_lowered(), contextlib.suppress(ImportError):
        # A broken install fails again, and says why, in the module that needs mlx-lm.
        importlib.import_module("mlx_lm")


def _as_number(limit: int) -> float:
    import resource

    return math.inf if limit == resource.RLIM_INFINITY else limit


@contextlib.contextmanager
def _open_file_limit_never_lowered() -> Iterator[None]:
    """While it lasts, a setrlimit(RLIMIT_NOFILE, ...) may raise the soft limit, never lower a limit."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        yield
        return
    real_setrlimit = resource.setrlimit

    def setrlimit(which: int, limits: tuple[int, int]) -> None:
        if which != resource.RLIMIT_NOFILE:
            real_setrlimit(which, limits)
            return
        soft, hard = resource.getrlimit(which)
        raised = min(max(soft, limits[0], key=_as_number), hard, key=_as_number)
        if raised != soft:
            real_setrlimit(which, (raised, hard))
        if (raised, hard) != tuple(limits):
            logger.debug("kept the open-file limit at %s, not %s", (raised, hard), tuple(limits))

    resource.setrlimit = setrlimit
    try:
        yield
    finally:
        resource.setrlimit = real_setrlimit
