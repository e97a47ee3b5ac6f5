"""What the tests of several API-server processes on one port share: the mark of a test that needs
SO_REUSEPORT (Linux)."""

from __future__ import annotations

import pytest

from batchlm.server.api_servers import shared_port_unsupported_reason

linux_only = pytest.mark.skipif(
    shared_port_unsupported_reason() is not None, reason="needs SO_REUSEPORT (Linux)"
)
