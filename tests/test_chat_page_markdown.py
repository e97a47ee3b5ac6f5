"""The chat page's Markdown renderer (ui/markdown.js) as a pure function, evaluated in a real headless
Chromium (the `browser` and `page` fixtures of conftest.py): the subset it renders, and that hostile
text never becomes markup beyond the renderer's own tags and attributes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from batchlm.server.background import BackgroundServer
from fake_engine import FakeEngine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def page_server() -> Iterator[BackgroundServer]:
    """Serves the page and its scripts."""
    with BackgroundServer(FakeEngine()) as running:
        yield running


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
    (
        "[Python](https://en.wikipedia.org/wiki/Python_(language)) (see)",
        '<p><a href="https://en.wikipedia.org/wiki/Python_(language)" target="_blank" rel="noopener noreferrer">'
        "Python</a> (see)</p>",
    ),
    ("***both*** and **b**", "<p><strong><em>both</em></strong> and <strong>b</strong></p>"),
    # Code in a link's label stays code; backticks in its URL are the URL's own characters.
    (
        "[`run()`](https://x.org/a) [b](https://x.org/`c`)",
        '<p><a href="https://x.org/a" target="_blank" rel="noopener noreferrer"><code>run()</code></a> '
        '<a href="https://x.org/`c`" target="_blank" rel="noopener noreferrer">b</a></p>',
    ),
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
    '[x](https://a.org/("onmouseover=alert(1))) [y](javascript:(alert(1)))',
    '```"><img src=x onerror=alert(1)>\ncode\n```',
    "``` onerror=alert(1)\ncode\n```",
    "`<svg onload=alert(1)>` **<iframe src=x>** _<a href=x>_",
    "\u0000 0 \u0000 <u>\u00000\u0000</u>",
    '[x](https://a.org/`"onmouseover=alert(1)`) [`<b>`](https://a.org/)',
    "> <style>*{}</style>\n- <form><input></form>\n# <h1 onclick=x>",
]
BLOCK_TAGS = {"P", "BR", "UL", "OL", "LI", "BLOCKQUOTE", "HR", "PRE", "DIV"}
INLINE_TAGS = {"STRONG", "EM", "DEL", "CODE", "A", "SPAN", "BUTTON"}
ALLOWED_TAGS = BLOCK_TAGS | INLINE_TAGS | {f"H{level}" for level in range(1, 7)}
ALLOWED_ATTRIBUTES = {"class", "href", "target", "rel", "type", "title", "start"}


def render_in_page(page: Any, sources: list[str]) -> list[str]:
    script = "async (sources) => { const md = await import('/ui/markdown.js'); return sources.map(md.renderMarkdown); }"
    return page.evaluate(script, sources)


def test_markdown_renders_its_subset(page: Any, page_server: BackgroundServer) -> None:
    page.goto(f"{page_server.base_url}/")
    rendered = render_in_page(page, [source for source, _ in RENDERED])
    for (source, expected), html in zip(RENDERED, rendered, strict=True):
        assert html == expected, source


def test_markdown_never_makes_markup_from_the_text(page: Any, page_server: BackgroundServer) -> None:
    """Rendered hostile text yields only the renderer's own tags and attributes, and links only to
    http(s) or mailto URLs."""
    page.goto(f"{page_server.base_url}/")
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
