"""Text that UTF-8 cannot encode: a lone UTF-16 surrogate, which JSON's "\\ud800" escapes allow in what
a client sends or a model writes, but no response body, prompt or file can hold."""

from __future__ import annotations


def encodes(text: str) -> bool:
    """False for a text UTF-8 cannot encode (one with a lone UTF-16 surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encodable(text: str) -> str:
    """`text` with anything UTF-8 cannot encode spelled as a backslash escape (a surrogate as the
    JSON escape it came from), so that it can always be sent or written."""
    return text if encodes(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")
