"""Takes docs/chat-page.png, the README's picture of the web chat page: a short conversation with a
scripted reply (tests/fake_engine.py), shown by Debian's headless Chromium through Playwright.

    python docs/chat_page_screenshot.py [--chromium /usr/bin/chromium] [--out docs/chat-page.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

QUESTION = "How do I stream a reply from batchlm in Python?"
REPLY = """Point the official `openai` client at the server and ask for a stream:

```python
from openai import OpenAI

client = OpenAI(base_url="http://localhost:8080/v1", api_key="EMPTY")
stream = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "Hello!"}],
    stream=True,
)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="")
```

- **stream=True** sends each token as soon as it is generated.
- Sampling fields such as `temperature` and `top_p` keep their OpenAI names."""
OLDER_TITLES = ["Continuous batching, explained", "Prefix caching and long prompts", "A haiku about GPUs"]


def older_conversations() -> str:
    """A few earlier conversations for the sidebar, as the page stores them."""
    conversations = [
        {
            "id": f"older-{i}",
            "title": title,
            "systemPrompt": "",
            "createdAt": i,
            "updatedAt": i,
            "messages": [],
        }
        for i, title in enumerate(OLDER_TITLES, start=1)
    ]
    return json.dumps(conversations)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chromium", default=None, help="default: $BATCHLM_CHROMIUM or /usr/bin/chromium")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "chat-page.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from batchlm.server.background import BackgroundServer

    sys.path.insert(0, str(ROOT / "tests"))
    from fake_engine import FakeEngine
    from headless_chromium import CHROMIUM, CHROMIUM_ARGS

    # One byte per token, at a pace like a small model on a laptop.
    engine = FakeEngine(reply=REPLY, served_model_name="my-model", max_model_len=4096, token_delay_s=0.008)
    with BackgroundServer(engine) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium or CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1180, "height": 800})
        page.goto(f"{server.base_url}/")
        page.evaluate("list => localStorage.setItem('batchlm.conversations', list)", older_conversations())
        page.reload()
        page.wait_for_selector("#server-status[data-state='ok']")
        page.fill("#prompt", QUESTION)
        page.press("#prompt", "Enter")
        page.wait_for_selector("body:not(.streaming) .message.assistant .stats:not(:empty)")
        page.mouse.move(0, 0)
        page.screenshot(path=str(args.out))
        browser.close()
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
