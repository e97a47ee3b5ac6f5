"""Request bodies sent compressed (Content-Encoding: gzip or deflate), decoded before anything reads
them, within the same size limit as a plain body (a small compressed body may inflate enormously)."""

from __future__ import annotations

import zlib

# zlib's wbits per encoding: gzip's header and trailer; deflate as HTTP defines it (a zlib stream).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Raw deflate, without the zlib wrapper: what some clients send as "deflate".
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS
DECODED = ("gzip", "x-gzip", "deflate", "identity")


class UnsupportedEncoding(Exception):
    """A Content-Encoding this server does not decode."""


class MalformedEncoding(Exception):
    """A body that is not what its Content-Encoding says."""


class DecodedTooLarge(Exception):
    """The decoded body grew past the limit."""


def content_codings(header: bytes) -> list[str]:
    """The codings of a Content-Encoding value, in the order they were applied."""
    return [part.strip().lower() for part in header.decode("latin-1").split(",") if part.strip()]


def decode_body(body: bytes, codings: list[str], max_bytes: int) -> bytes:
    """`body` with its codings undone (last applied first); raises UnsupportedEncoding,
    MalformedEncoding or DecodedTooLarge."""
    for coding in reversed(codings):
        if coding not in DECODED:
            raise UnsupportedEncoding(coding)
        if coding != "identity":
            body = _inflate(body, coding, max_bytes)
    return body


def _inflate(body: bytes, coding: str, max_bytes: int) -> bytes:
    wbits = _WBITS[coding]
    try:
        return _inflate_with(body, wbits, max_bytes)
    except zlib.error as error:
        if coding == "deflate":
            try:
                return _inflate_with(body, _RAW_DEFLATE_WBITS, max_bytes)
            except zlib.error:
                pass
        raise MalformedEncoding(f"{coding}: {error}") from None


def _inflate_with(body: bytes, wbits: int, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    # One byte past the limit tells "too large" from "exactly the limit".
    decoded = inflater.decompress(body, max_bytes + 1)
    if len(decoded) > max_bytes:
        raise DecodedTooLarge
    if not inflater.eof:
        raise zlib.error("the compressed body ends early")
    return decoded
