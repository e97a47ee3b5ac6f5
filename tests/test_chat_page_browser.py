"""The web chat page in a real headless Chromium (Debian's package, driven by Playwright): it loads,
streams replies from the tiny random-weight model, keeps conversations across a reload, shows model
markup as text, works with a keyed server, and says when the server is loading, overloaded, hung or
gone (in the middle of a reply too).

The browser and its pages are conftest.py's `browser` and `page` fixtures (they skip without Chromium,
except under CI); the Markdown renderer's own tests are in test_chat_page_markdown.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from batchlm.config import EngineConfig
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine, free_port, wait_until

pytestmark = pytest.mark.slow

API_KEY = "sk-page-test"
HOSTILE_REPLY = (
    'Careful: <script>window.__injected = "script"</script> and '
    '<img src="x" onerror="window.__injected = \'img\'"> stay text. **Bold** and `code<b>`.'
)


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
    page.wait_for_selector("#settings", state="hidden")  # saved: the dialog closed


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


def is_healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=30).status_code == 200
    except httpx.TransportError:
        return False


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


PREFIX = "/llm"


@pytest.fixture(scope="module")
def prefixed_server() -> Iterator[BackgroundServer]:
    engine = FakeEngine(reply=HOSTILE_REPLY)
    with BackgroundServer(engine, ServerSettings(api_key=API_KEY, root_path=PREFIX)) as running:
        yield running


@pytest.mark.parametrize(
    ("path", "announced", "strips"),
    [(f"{PREFIX}/", None, True), (PREFIX, PREFIX, True), (PREFIX, None, False), (f"{PREFIX}/", None, False)],
    ids=["stripped", "stripped-announced", "root-path", "root-path-slash"],
)
def test_the_page_works_behind_a_proxy_under_a_prefix(
    page: Any,
    request: pytest.FixtureRequest,
    path: str,
    announced: str | None,
    strips: bool,
) -> None:
    """A reverse proxy serving the server at /llm/ passes on only what is under /llm: stripped of it
    (nginx's `location /llm/ { proxy_pass http://server/; }`, Traefik's StripPrefix), or as it is to
    a server run with --root-path /llm. The page's files and calls must all go there. At /llm itself
    (no slash) the page works where the prefix is known: --root-path, or announced in
    X-Forwarded-Prefix (as Traefik does)."""
    server: BackgroundServer = request.getfixturevalue("keyed_server" if strips else "prefixed_server")
    strays: list[str] = []

    def proxy(route: Any) -> None:
        url = urlsplit(route.request.url)
        if url.path != PREFIX and not url.path.startswith(f"{PREFIX}/"):
            strays.append(url.path)
            route.fulfill(status=404, body="not found")
            return
        forwarded = (url.path[len(PREFIX) :] or "/") if strips else url.path
        headers = dict(route.request.headers)
        if announced is not None:
            headers["x-forwarded-prefix"] = announced
        query = f"?{url.query}" if url.query else ""
        route.fulfill(response=route.fetch(url=f"{server.base_url}{forwarded}{query}", headers=headers))

    page.route("**/*", proxy)
    page.goto(f"{server.base_url}{path}")
    page.wait_for_selector("#server-status[data-state='ok']")
    change_settings(page, {"#api-key": API_KEY})
    page.wait_for_selector("#model-name:text-is('fake-model')")
    send(page, "Hi")
    reply = wait_for_reply(page)
    assert reply.locator(".message-error").count() == 0
    assert "stay text" in reply.locator(".content").text_content()
    assert strays == []


THOUGHT = "Plan: <b>this</b> stays text."


@pytest.fixture(scope="module")
def thinking_server() -> Iterator[BackgroundServer]:
    engine = FakeEngine(reply=f"<think>\n{THOUGHT}\n</think>\n\nThe **answer**.")
    with BackgroundServer(engine, ServerSettings(reasoning_parser="think")) as running:
        yield running


def test_a_reasoning_models_thinking_is_folded_above_its_answer(
    page: Any, thinking_server: BackgroundServer
) -> None:
    open_chat(page, thinking_server)
    send(page, "Think first")
    reply = wait_for_reply(page)
    thinking = reply.locator(".thinking")
    assert thinking.locator("summary").text_content() == "Thought"
    assert not thinking.evaluate("node => node.open")
    assert thinking.locator(".thinking-text").text_content() == THOUGHT
    assert thinking.locator("b").count() == 0
    assert reply.locator(".content strong").text_content() == "answer"
    assert "<think>" not in reply.locator(".content").text_content()
    thinking.locator("summary").click()
    assert thinking.evaluate("node => node.open")
    page.reload()
    kept = wait_for_reply(page).locator(".thinking .thinking-text")
    assert kept.text_content() == THOUGHT, "the thinking is kept with the conversation"


def test_a_reply_stopped_while_thinking_says_it_thought(page: Any, thinking_server: BackgroundServer) -> None:
    open_chat(page, thinking_server)
    change_settings(page, {"#max-tokens": "16"})  # "<think>\n" and 8 characters of the thought
    send(page, "Think first")
    reply = wait_for_reply(page)
    assert reply.locator(".thinking-text").text_content() == THOUGHT[:8]
    assert reply.locator(".thinking summary").text_content() == "Thought"
    assert "stopped at max tokens" in reply.locator(".stats").text_content()


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


def test_by_default_the_page_leaves_sampling_to_the_model(page: Any, keyed_server: BackgroundServer) -> None:
    # Without a temperature or top p of the user's, the server samples as the model recommends.
    open_chat(page, keyed_server, API_KEY)
    with page.expect_request("**/v1/chat/completions") as sent:
        send(page, "Hello")
    wait_for_reply(page)
    assert not {"temperature", "top_p", "max_tokens"} & set(sent.value.post_data_json)
    page.click("#open-settings")
    assert [page.input_value(f"#{field}") for field in ("temperature", "top-p", "max-tokens")] == ["", "", ""]


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


def test_settings_take_values_between_steps_and_clamp_the_rest(
    page: Any, keyed_server: BackgroundServer
) -> None:
    # The inputs' step and range guide their arrows; they must not refuse a valid temperature.
    open_chat(page, keyed_server, API_KEY)
    change_settings(page, {"#temperature": "0.33", "#top-p": "1.5", "#max-tokens": "12.5"})
    with page.expect_request("**/v1/chat/completions") as sent:
        send(page, "Hello")
    wait_for_reply(page)
    body = sent.value.post_data_json
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.33, 1, 13)


def test_a_server_now_serving_another_model_is_followed(page: Any, thinking_server: BackgroundServer) -> None:
    """The page learnt the model's name before the server was restarted with another one: the refusal
    makes it ask again, so Regenerate works. (A server without a key: the page asks for the models
    once, at start.)"""
    old_list = {"object": "list", "data": [{"id": "old-model", "object": "model"}]}
    page.route("**/v1/models", lambda route: route.fulfill(json=old_list))
    open_chat(page, thinking_server)
    assert page.text_content("#model-name") == "old-model"
    page.unroute("**/v1/models")
    send(page, "Hi")
    assert "does not exist" in wait_for_reply(page).locator(".message-error").text_content()
    page.wait_for_selector("#model-name:text-is('fake-model')")
    page.locator(".message.assistant [data-action='regenerate']").click()
    reply = wait_for_reply(page)
    assert reply.locator(".message-error").count() == 0
    assert reply.locator(".content strong").text_content() == "answer"


def test_a_stream_closed_before_its_end_is_not_taken_for_a_whole_reply(
    page: Any, keyed_server: BackgroundServer
) -> None:
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Hal"}}]}
    cut_short = f"data: {json.dumps(chunk)}\n\n"  # no finish reason, no [DONE]
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(body=cut_short, headers={"Content-Type": "text/event-stream"}),
    )
    open_chat(page, keyed_server, API_KEY)
    send(page, "Hello")
    reply = wait_for_reply(page)
    assert reply.locator(".content > p").text_content() == "Hal"
    assert "connection to the server was lost" in reply.locator(".message-error").text_content()


def test_stop_keeps_the_partial_reply_and_edit_sends_again(page: Any, keyed_server: BackgroundServer) -> None:
    engine = keyed_server.engine
    assert isinstance(engine, FakeEngine)
    open_chat(page, keyed_server, API_KEY)
    # A token a second: the reply (about 150 tokens) is still streaming when the page's Stop is clicked,
    # however slowly a loaded machine runs the browser; the stop ends it at once.
    engine.token_delay_s = 1.0
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


def test_a_server_that_dies_mid_reply_is_reported(page: Any, tmp_path: Path) -> None:
    """A server process killed while it streams: the partial reply stays, with an error that says the
    connection was lost, and the page finds the server gone."""
    port = free_port()
    script = Path(__file__).with_name("fake_engine.py")
    # A token a second: the reply is still streaming when the process is killed.
    command = [sys.executable, str(script), "--port", str(port), "--token-delay", "1"]
    # Killed, it leaves its temporary files (the stored responses' database): under tmp_path, not /tmp.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: is_healthy(base_url), 120, "the server process to be ready")
        page.goto(f"{base_url}/")
        page.wait_for_selector("#model-name:not(:empty)")
        send(page, "Hello")
        page.wait_for_selector("body.streaming .message.assistant .content:not(:empty)")
        process.kill()
        reply = wait_for_reply(page)
    finally:
        process.kill()
        process.wait()
    assert reply.locator(".content > p").text_content().startswith("H")
    error = reply.locator(".message-error").text_content()
    assert (
        error
        == "The connection to the server was lost before the reply ended. Is batchlm serve still running?"
    )
    page.wait_for_selector("#server-status[data-state='unreachable']")


def test_a_server_that_does_not_answer_is_reported(page: Any, thinking_server: BackgroundServer) -> None:
    # A hung server (a stopped process) keeps its connections open without answering.
    page.route("**/health", lambda route: None)
    page.goto(f"{thinking_server.base_url}/")
    page.wait_for_selector("#server-status[data-state='not_responding']")
    assert "does not answer" in page.text_content("#banner")
    page.unroute("**/health")
    page.wait_for_selector("#server-status[data-state='ok']")
    assert page.is_hidden("#banner")


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
