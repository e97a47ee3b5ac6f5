"""How the chat page's browser tests and docs/chat_page_screenshot.py start Debian's Chromium."""

from __future__ import annotations

import os

CHROMIUM = os.environ.get("BATCHLM_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium hangs on refused connections on these machines.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
