"""The web chat page in a real headless Chromium (Debian's package, driven by Playwright): it loads,
streams replies from the tiny random-weight model, keeps conversations across a reload, shows model
markup as text, works with a keyed server, and says when the server is loading, overloaded or gone.

Without /usr/bin/chromium (or $BATCHLM_CHROMIUM) these tests skip, except under CI ($CI set, or
$BATCHLM_REQUIRE_BROWSER, which .ci/run sets), where a missing browser is a failure."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from batchlm.config import EngineConfig
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine, wait_until
from headless_chromium import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.slow

API_KEY = "sk-page-test"
HOSTILE_REPLY = (
    'Careful: <script>window.__injected = "script"</script> and '
    '<img src="x" onerror="window.__injected = \'img\'"> stay text. **Bold** and `code<b>`.'
)
WAIT_MS = 60_000


def _unavailable(reason: str) -> NoReturn:
    required = (os.environ.get(name, "").lower() for name in ("CI", "BATCHLM_REQUIRE_BROWSER"))
    if any(value not in ("", "0", "false") for value in required):
        pytest.fail(f"{reason} (CI must run the browser tests; .ci/run installs Debian's chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = shutil.which(CHROMIUM)
    if executable is None:
        _unavailable(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (it is in the dev extra)")
    with sync_playwright() as playwright:
        # Playwright gives each launch a new empty profile directory of its own.
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _note_policy_violation(text: str, errors: list[str]) -> None:
    """The page's own code must run under its Content-Security-Policy."""
    if "Content Security Policy" in text:
        errors.append(text)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (its own localStorage); fails the test on any uncaught page error."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    context.set_default_timeout(WAIT_MS)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on("console", lambda message: _note_policy_violation(message.text, errors))
    yield opened
    context.close()
    assert errors == []


@pytest.fixture(scope="module")
def model_server(tiny_model_dir: Callable[..., Path]) -> Iterator[BackgroundServer]:
    config = EngineConfig(model=str(tiny_model_dir("llama")), device="cpu", served_model_name="tiny")
    engine = AsyncLLMEngine(config, multiprocess=False)
    with BackgroundServer(engine, start_engine=engine.start) as running:
        running.wait_until_ready(180)
        yield running


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[BackgroundServer]:
    engine = FakeEngine(reply=HOSTILE_REPLY)
    with BackgroundServer(engine, ServerSettings(api_key=API_KEY)) as running:
        yield running


def open_chat(
    page: Any, server: BackgroundServer, api_key: str | None = None, models_listed: bool = True
) -> None:
    """Opens the page, waits until it found the server ready, enters the key when given and, unless
    the server will not list them (a key it lacks), waits for the models: the page shows the server
    ready first and asks for /v1/models after."""
    page.goto(f"{server.base_url}/")
    page.wait_for_selector("#server-status[data-state='ok']")
    if api_key is not None:
        change_settings(page, {"#api-key": api_key})
    if models_listed:
        page.wait_for_selector("#model-name:not(:empty)")


def change_settings(page: Any, values: dict[str, str]) -> None:
    page.click("#open-settings")
    for selector, value in values.items():
        page.fill(selector, value)
    page.click("#save-settings")


def send(page: Any, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_for_reply(page: Any, count: int = 1) -> Any:
    """Waits until the `count`-th reply is shown and nothing streams; returns it. (Selectors, not
    script predicates: the page's Content-Security-Policy forbids the eval those need.)"""
    page.wait_for_selector(f"body:not(.streaming) #messages > .message:nth-child({2 * count}).assistant")
    return page.locator(".message.assistant").nth(count - 1)


def stored_conversations(page: Any) -> list[dict[str, Any]]:
    return json.loads(page.evaluate("localStorage.getItem('batchlm.conversations')") or "[]")


# -- the page with the tiny model ----------------------------------------------------------------


def test_the_page_loads_and_names_the_model(page: Any, model_server: BackgroundServer) -> None:
    open_chat(page, model_server)
    assert page.title() == "batchlm chat"
    assert page.text_content("#model-name") == "tiny"
    assert "Chat with tiny" in page.text_content("#messages")
    assert page.is_hidden("#banner")


def test_a_message_streams_the_models_reply(page: Any, model_server: BackgroundServer) -> None:
    """Greedy, so the page's reply must be exactly what the API answers for the same conversation."""
    open_chat(page, model_server)
    change_settings(page, {"#temperature": "0", "#max-tokens": "12", "#system-prompt": "Be brief."})
    send(page, "Hello there")
    reply = wait_for_reply(page)
    [conversation] = stored_conversations(page)
    assert conversation["title"] == "Hello there"
    shown = conversation["messages"][1]["content"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 12}
    expected = httpx.post(f"{model_server.base_url}/v1/chat/completions", json=body, timeout=60).json()
    assert shown == expected["choices"][0]["message"]["content"]
    usage = expected["usage"]
    stats = reply.locator(".stats").text_content()
    assert f"{usage['completion_tokens']} tokens" in stats
    assert f"prompt {usage['prompt_tokens']} tokens" in stats
    assert "tok/s" in stats


def test_a_conversation_survives_a_reload(page: Any, model_server: BackgroundServer) -> None:
    open_chat(page, model_server)
    change_settings(page, {"#max-tokens": "6"})
    send(page, "First question")
    wait_for_reply(page)
    send(page, "Second question")
    wait_for_reply(page, 2)
    before = page.locator(".message .content").all_text_contents()
    page.locator(".conversation.active [data-action='rename']").click()
    page.fill(".rename-box", "Kept across reloads")
    page.press(".rename-box", "Enter")

    page.reload()
    page.wait_for_selector(".message.assistant")
    assert page.locator(".message .content").all_text_contents() == before
    assert before[0::2] == ["First question", "Second question"]
    assert page.text_content("#chat-title") == "Kept across reloads"
    assert page.locator(".conversation-title").all_text_contents() == ["Kept across reloads"]


# -- the page with the keyed fake engine ---------------------------------------------------------


def test_model_markup_is_shown_as_text(page: Any, keyed_server: BackgroundServer) -> None:
    open_chat(page, keyed_server, API_KEY)
    send(page, "Say something dangerous")
    content = wait_for_reply(page).locator(".content")
    assert content.text_content() == (
        'Careful: <script>window.__injected = "script"</script> and '
        '<img src="x" onerror="window.__injected = \'img\'"> stay text. Bold and code<b>.'
    )
    assert content.locator("script, img, b").count() == 0
    assert content.locator("strong").text_content() == "Bold"
    assert content.locator("code").text_content() == "code<b>"
    assert page.evaluate("window.__injected") is None


def test_copy_buttons_copy_the_code_and_the_whole_reply(page: Any, keyed_server: BackgroundServer) -> None:
    engine = keyed_server.engine
    assert isinstance(engine, FakeEngine)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    open_chat(page, keyed_server, API_KEY)
    text = "Run this:\n\n```sh\necho '<hi>' && ls\n```\nDone."
    engine.reply = text
    try:
        send(page, "A command please")
        reply = wait_for_reply(page)
    finally:
        engine.reply = HOSTILE_REPLY

    def clipboard_holds(expected: str) -> Callable[[], bool]:
        return lambda: page.evaluate("navigator.clipboard.readText()") == expected

    reply.locator(".copy-code").click()
    wait_until(clipboard_holds("echo '<hi>' && ls"), 30, "the code block on the clipboard")
    reply.hover()
    reply.locator("[data-action='copy']").click()
    wait_until(clipboard_holds(text), 30, "the whole reply on the clipboard")


def test_a_keyed_server_needs_and_takes_the_key(page: Any, keyed_server: BackgroundServer) -> None:
    open_chat(page, keyed_server, models_listed=False)
    page.wait_for_selector("#banner:not([hidden])")
    assert "API key" in page.text_content("#banner")
    send(page, "Hi")
    assert "API key" in wait_for_reply(page).locator(".message-error").text_content()

    change_settings(page, {"#api-key": API_KEY})
    page.wait_for_selector("#model-name:text-is('fake-model')")
    assert page.is_hidden("#banner")
    page.locator(".message.assistant [data-action='regenerate']").click()
    reply = wait_for_reply(page)
    assert reply.locator(".message-error").count() == 0
    assert "stay text" in reply.locator(".content").text_content()
    engine = keyed_server.engine
    assert isinstance(engine, FakeEngine)
    assert engine.tokenizer.decode(engine.calls[-1].prompt_token_ids) == "<|user|>Hi\n<|assistant|>"


def test_settings_shape_the_request_and_are_kept(page: Any, keyed_server: BackgroundServer) -> None:
    open_chat(page, keyed_server, API_KEY)
    values = {"#temperature": "0.3", "#top-p": "0.9", "#max-tokens": "400", "#system-prompt": "Be kind."}
    change_settings(page, values)
    with page.expect_request("**/v1/chat/completions") as sent:
        send(page, "Hello")
    wait_for_reply(page)
    request = sent.value
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.post_data_json == {
        "model": "fake-model",
        "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 400,
    }
    page.reload()
    page.click("#open-settings")
    assert {selector: page.input_value(selector) for selector in values} == values
    assert page.input_value("#api-key") == API_KEY


def test_stop_keeps_the_partial_reply_and_edit_sends_again(page: Any, keyed_server: BackgroundServer) -> None:
    engine = keyed_server.engine
    assert isinstance(engine, FakeEngine)
    open_chat(page, keyed_server, API_KEY)
    engine.token_delay_s = 0.05  # the reply streams for seconds: time to see it grow and stop it
    try:
        send(page, "A long answer please")
        # Part of the reply is on the page while the stream is still open.
        page.wait_for_selector("body.streaming .message.assistant .content:not(:empty)")
        page.click("#stop")
        reply = wait_for_reply(page)
    finally:
        engine.token_delay_s = 0.0
    partial = stored_conversations(page)[0]["messages"][1]["content"]
    assert 0 < len(partial) < len(HOSTILE_REPLY)
    assert "stopped" in reply.locator(".stats").text_content()

    page.locator(".message.user").hover()
    page.locator(".message.user [data-action='edit']").click()
    page.fill(".edit-box", "A short answer")
    page.locator(".edit-buttons .primary").click()
    wait_for_reply(page)
    messages = stored_conversations(page)[0]["messages"]
    assert [m["content"] for m in messages] == ["A short answer", HOSTILE_REPLY]


def test_export_import_and_delete(page: Any, keyed_server: BackgroundServer, tmp_path: Path) -> None:
    open_chat(page, keyed_server, API_KEY)
    send(page, "Keep this one")
    wait_for_reply(page)
    with page.expect_download() as download:
        page.click("#export")
    exported = tmp_path / "chats.json"
    download.value.save_as(exported)
    assert json.loads(exported.read_text())["conversations"] == stored_conversations(page)

    page.on("dialog", lambda dialog: dialog.accept())  # "Delete this conversation?"
    page.locator(".conversation.active [data-action='delete']").click()
    page.wait_for_selector(".empty-state")
    assert stored_conversations(page) == []
    page.set_input_files("#import-file", str(exported))
    page.wait_for_selector(".conversation-title:text-is('Keep this one')")
    assert "Imported 1 conversation" in page.text_content("#banner")
    page.click(".conversation-title")
    assert page.locator(".message .content").all_text_contents()[0] == "Keep this one"
    page.set_input_files(
        "#import-file", {"name": "bad.json", "mimeType": "application/json", "buffer": b"[1"}
    )
    page.wait_for_selector("#banner:has-text('Could not import bad.json')")


def test_an_overloaded_server_is_reported(page: Any, keyed_server: BackgroundServer) -> None:
    engine = keyed_server.engine
    assert isinstance(engine, FakeEngine)
    open_chat(page, keyed_server, API_KEY)
    engine.max_in_flight = 0
    try:
        send(page, "Anyone there?")
        error = wait_for_reply(page).locator(".message-error").text_content()
    finally:
        engine.max_in_flight = None
    assert "overloaded" in error


# -- server states -------------------------------------------------------------------------------


def test_loading_then_unreachable_are_reported(page: Any) -> None:
    engine = FakeEngine(ready=False)
    server = BackgroundServer(engine).start()
    try:
        page.goto(f"{server.base_url}/")
        page.wait_for_selector("#server-status[data-state='loading']")
        assert "still loading" in page.text_content("#banner")
    finally:
        server.stop()
    page.wait_for_selector("#server-status[data-state='unreachable']")
    assert "Cannot reach the server" in page.text_content("#banner")


# -- the Markdown renderer as a pure function, evaluated in the page -----------------------------

RENDERED = [
    ("plain <b>bold</b> & 'quotes'", "<p>plain &lt;b&gt;bold&lt;/b&gt; &amp; &#39;quotes&#39;</p>"),
    (
        "**a** *b* _c_ ~~d~~ `e<f>`",
        "<p><strong>a</strong> <em>b</em> <em>c</em> <del>d</del> <code>e&lt;f&gt;</code></p>",
    ),
    ("snake_case_name and 2*3*4", "<p>snake_case_name and 2*3*4</p>"),
    ("# Title\nline one\nline two", "<h1>Title</h1>\n<p>line one<br>line two</p>"),
    (
        "- a\n- b\n  - c\n\n3. x\n4. y",
        '<ul><li>a</li><li>b\n<ul><li>c</li></ul></li></ul>\n<ol start="3"><li>x</li><li>y</li></ol>',
    ),
    ("> quoted **b**\n\n---", "<blockquote><p>quoted <strong>b</strong></p></blockquote>\n<hr>"),
    (
        "[site](https://example.org/?a=1&b=2)",
        '<p><a href="https://example.org/?a=1&amp;b=2" target="_blank" rel="noopener noreferrer">site</a></p>',
    ),
    ("[bad](javascript:alert(1))", "<p>[bad](javascript:alert(1))</p>"),
]
CODE_BLOCK = (
    '<div class="code-block"><div class="code-header"><span class="code-language">{lang}</span>'
    '<button type="button" class="copy-code" title="Copy code">Copy</button></div>'
    '<pre><code class="language-{lang}">{code}</code></pre></div>'
)
RENDERED += [
    (
        "```html\n<script>x()</script>\n**not bold**\n```",
        CODE_BLOCK.format(lang="html", code="&lt;script&gt;x()&lt;/script&gt;\n**not bold**"),
    ),
    ("```py\nstill streaming <i>", CODE_BLOCK.format(lang="py", code="still streaming &lt;i&gt;")),
]
HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    '[x](https://a.org/"onmouseover="alert(1))',
    "[x](javascript:alert(1)) [y](JAVASCRIPT:alert(1)) [z](data:text/html,<b>)",
    '```"><img src=x onerror=alert(1)>\ncode\n```',
    "``` onerror=alert(1)\ncode\n```",
    "`<svg onload=alert(1)>` **<iframe src=x>** _<a href=x>_",
    "\u0000 0 \u0000 <u>\u00000\u0000</u>",
    "> <style>*{}</style>\n- <form><input></form>\n# <h1 onclick=x>",
]
BLOCK_TAGS = {"P", "BR", "UL", "OL", "LI", "BLOCKQUOTE", "HR", "PRE", "DIV"}
INLINE_TAGS = {"STRONG", "EM", "DEL", "CODE", "A", "SPAN", "BUTTON"}
ALLOWED_TAGS = BLOCK_TAGS | INLINE_TAGS | {f"H{level}" for level in range(1, 7)}
ALLOWED_ATTRIBUTES = {"class", "href", "target", "rel", "type", "title", "start"}


def render_in_page(page: Any, sources: list[str]) -> list[str]:
    script = "async (sources) => { const md = await import('/ui/markdown.js'); return sources.map(md.renderMarkdown); }"
    return page.evaluate(script, sources)


def test_markdown_renders_its_subset(page: Any, keyed_server: BackgroundServer) -> None:
    page.goto(f"{keyed_server.base_url}/")
    rendered = render_in_page(page, [source for source, _ in RENDERED])
    for (source, expected), html in zip(RENDERED, rendered, strict=True):
        assert html == expected, source


def test_markdown_never_makes_markup_from_the_text(page: Any, keyed_server: BackgroundServer) -> None:
    """Rendered hostile text yields only the renderer's own tags and attributes, and links only to
    http(s) or mailto URLs."""
    page.goto(f"{keyed_server.base_url}/")
    found = page.evaluate(
        """async (sources) => {
            const md = await import('/ui/markdown.js');
            return sources.map((source) => {
                const box = document.createElement('template');
                box.innerHTML = md.renderMarkdown(source);
                return [...box.content.querySelectorAll('*')].map((node) => ({
                    tag: node.tagName,
                    attributes: [...node.attributes].map((a) => [a.name, a.value]),
                }));
            });
        }""",
        HOSTILE,
    )
    for source, nodes in zip(HOSTILE, found, strict=True):
        for node in nodes:
            assert node["tag"] in ALLOWED_TAGS, source
            for name, value in node["attributes"]:
                assert name in ALLOWED_ATTRIBUTES, source
                if name == "href":
                    assert value.startswith(("https://", "http://", "mailto:")) and '"' not in value, source
                if name == "class":
                    assert " " not in value.strip() and "=" not in value, source
