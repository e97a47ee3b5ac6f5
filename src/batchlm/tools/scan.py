"""A model output read so far, as content and calls, and the rules every parser shares for it.

Each parser scans the whole output (`ToolParser.scan`); a stream rescans it at every delta but those
the last scan settles alone (`Scan.continued`: a delta inside the arguments of a call still arriving,
or, where the family reads its output's end on, text after the calls and inside a value still open).
What a scan reports as content or as a call's arguments only ever grows as the output grows, so a
stream sends the difference between two scans, and the stream's pieces add up to the parse of the
whole output."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from batchlm.tools.json_scan import JsonCursor, ObjectScan, json_cursor, scan_object, skip_whitespace
from batchlm.unicode_text import encodable


@dataclass
class CallScan:
    # Set once the call can be announced: its name is complete and its arguments have begun.
    name: str | None
    # The arguments' JSON text as far as it is known.
    arguments: str
    done: bool
    # The arguments are the output's last text, an object or a string still open, and this is where
    # their JSON stands: text that keeps them open and JSON is theirs and changes nothing else of the
    # scan (an object's text grows by it; a string's arguments stay empty until it closes). None
    # otherwise.
    cursor: JsonCursor | None = None


class OpenEnd(Protocol):
    """How a family reads an output on from where its scan ended (in text, or in markup still open),
    where what follows can change nothing of the scan but the content's end."""

    def read(self, delta: str) -> tuple[str, OpenEnd] | None:
        """The content that `delta` adds, and the end after it; None where it may change more (a
        marker, a closing tag): the output is read again."""


@dataclass
class Scan:
    content: str
    calls: list[CallScan] = field(default_factory=list)
    # Per call: how much of the content comes before it (none where not given).
    offsets: list[int] = field(default_factory=list)
    # Where the output ends, as its family reads on from there (None: read the output again).
    end: OpenEnd | None = None

    def continued(self, delta: str) -> Scan | None:
        """The scan of the output with `delta` after it, where this scan settles it without reading the
        output again (its end reads `delta` on, or its last call's arguments are still open and stay
        open and JSON with `delta`); else None. Keeps a stream's cost a delta from growing with the
        length of a call or of the text. A stream keeps only the scan that continues this one: this
        scan may hand its content, or its last call's arguments, over to it (left empty here)."""
        if self.end is not None:
            read = self.end.read(delta)
            if read is None:
                return None
            shown, end = read
            # Handed over, the content is its only reference: it grows in place (as the stream's text
            # does) instead of being copied at every delta.
            content, self.content = self.content, ""
            content += shown
            return Scan(content, self.calls, self.offsets, end)
        last = self.calls[-1] if self.calls else None
        if last is None or last.cursor is None:
            return None
        cursor = last.cursor.read(delta)
        if cursor is None or not cursor.open:
            return None
        arguments = last.arguments
        if cursor.containers:
            # Handed over as the content is above: the arguments grow in place, not copied each delta.
            last.arguments = ""
            arguments += delta
        grown = CallScan(last.name, arguments, last.done, cursor)
        return Scan(self.content, [*self.calls[:-1], grown], self.offsets)


def call_from_object(
    text: str, scan: ObjectScan, argument_keys: tuple[str, ...], arguments_required: bool = False
) -> CallScan | None:
    """The call a {"name": ..., <argument key>: {...}} object holds; None when it cannot be one. An
    object's arguments stream raw as they arrive; a string holding JSON is unwrapped once closed."""
    done = scan.end is not None
    name_span = scan.fields.get("name")
    name = None
    if name_span is not None and name_span.end is not None:
        # Only strings are decoded here: a value nested deep enough could stop Python's reader.
        if not text.startswith('"', name_span.start):
            return None
        name = encodable(json.loads(text[name_span.start : name_span.end]))
    if scan.malformed or (done and name is None):
        return None
    # The first of the keys the object gives: the one a stream has sent by the time another comes.
    key = min(
        (k for k in argument_keys if k in scan.fields), key=lambda k: scan.fields[k].start, default=None
    )
    if key is None:
        if done and arguments_required:
            return None
        return CallScan(name if done else None, "{}" if done else "", done)
    span = scan.fields[key]
    if span.end is None:
        # An object streams raw as it arrives; a string holding JSON, once closed.
        opening = text[span.start : span.start + 1]
        cursor = json_cursor(text, span.start) if opening in ("{", '"') else None
        return CallScan(name, text[span.start :] if opening == "{" else "", False, cursor=cursor)
    raw = text[span.start : span.end]
    if text.startswith('"', span.start):
        # An empty string is no arguments, which clients parse as JSON: an empty object, as OpenAI's.
        unwrapped = json.loads(raw)
        return CallScan(name, encodable(unwrapped) if unwrapped.strip() else "{}", done)
    return CallScan(name, raw, done)


@dataclass(frozen=True)
class MarkedRegion:
    """Calls read from one stretch of markup (a marker's region, a JSON array of calls), and where text
    starts again: just past the markup, or None while it is still arriving."""

    calls: list[CallScan]
    end: int | None
    # Still arriving: where the family reads on from the output's end, if it does.
    open_end: OpenEnd | None = None


def scan_call_array(text: str, pos: int, final: bool, argument_keys: tuple[str, ...]) -> MarkedRegion | None:
    """The calls of a JSON array of call objects whose '[' is at text[pos]; None when malformed."""
    calls: list[CallScan] = []
    pos = skip_whitespace(text, pos + 1)
    while pos < len(text):
        if text[pos] == "]":
            return MarkedRegion(calls, pos + 1)
        if text[pos] != "{":
            return None
        scan = scan_object(text, pos, final)
        call = call_from_object(text, scan, argument_keys)
        if call is None:
            return None
        calls.append(call)
        if scan.end is None:
            return None if final else MarkedRegion(calls, None)
        pos = skip_whitespace(text, scan.end)
        if text.startswith(",", pos):
            pos = skip_whitespace(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            return None
    return None if final else MarkedRegion(calls, None)


class ScanBuilder:
    """Assembles a Scan from the output's pieces in order: text, and the calls read out of its markup.

    The content is the text around the calls as the model wrote it, less the whitespace that only
    separates it from a call (vLLM's parsers trim it likewise): blanks between the output's start and a
    leading call, between calls, and between the last call and the output's end are dropped; where calls
    come between two texts, the blanks the model wrote before the first of them join the two (those
    after the last call where it wrote none before), so that "Hi <call> there" reads "Hi there". A blank
    that a call may still follow, or that may still join the text to a call's, is held back until it is
    known which it is: the rule is the same for every scan of a growing output, so a stream's content
    deltas add up to the whole reply's content."""

    def __init__(self, final: bool) -> None:
        self.final = final
        self.calls: list[CallScan] = []
        self._offsets: list[int] = []
        self._content: list[str] = []
        self._length = 0
        # Blanks since the last non-blank text: written before any call since (`_before`), and after
        # the last call since (`_after`); whether a call came since; whether any text came yet.
        self._before = ""
        self._after = ""
        self._call_since = False
        self._text_seen = False
        # The end of the last text that may still begin a marker, held back.
        self._held_marker = ""

    def call(self, call: CallScan) -> None:
        self.calls.append(call)
        self._offsets.append(self._length)
        self._call_since = True
        self._after = ""

    def text(self, text: str) -> None:
        """Text of the output: before a call, or markup that did not read as one."""
        self._add(text)

    def tail(self, text: str, markers: tuple[str, ...]) -> None:
        """The output's last piece of text, which a marker may still follow."""
        cut = len(text) if self.final else len(text) - partial_marker_length(text, markers)
        self._add(text[:cut])
        self._held_marker = text[cut:]

    def text_end(self, markers: tuple[str, ...]) -> TextEnd | None:
        """The output's end, once its last text is added, where later text only extends the content:
        the content ends in that text (no call since), and `markers` may open a call after it (none
        where the rest of the output is text). None otherwise, and for a final scan."""
        if self.final or self._call_since or not self._text_seen:
            return None
        return TextEnd(self._before + self._held_marker, markers)

    def _add(self, text: str) -> None:
        self._held_marker = ""
        body = text.lstrip()
        lead = text[: len(text) - len(body)]
        if not body:
            if self._call_since:
                self._after += lead
            else:
                self._before += lead
            return
        if not self._call_since:
            joint = self._before + lead
        elif self._text_seen:
            joint = self._before or self._after + lead
        else:
            joint = ""  # the content starts after a call
        trimmed = body.rstrip()
        self._content += [joint, trimmed]
        self._length += len(joint) + len(trimmed)
        self._before, self._after = body[len(trimmed) :], ""
        self._call_since, self._text_seen = False, True

    def build(self, end: OpenEnd | None = None) -> Scan:
        # Blanks at the end: a call may still follow them, or one came after them.
        blanks = self._before if self.final and not self._call_since else ""
        return Scan("".join(self._content) + blanks, self.calls, self._offsets, end)


@dataclass(frozen=True)
class TextEnd:
    """An output that ends in text its content shows, but for its end (`held`): blanks a call may
    still follow, and text that may begin one of `markers`. Later text without a marker only
    extends the content (`ScanBuilder`'s rule: it joins the held blanks)."""

    held: str
    markers: tuple[str, ...]

    def read(self, delta: str) -> tuple[str, TextEnd] | None:
        text = self.held + delta
        if any(marker in text for marker in self.markers):
            return None
        shown = text[: len(text) - partial_marker_length(text, self.markers)].rstrip()
        return shown, TextEnd(text[len(shown) :], self.markers)


# Reads the region starting at `pos` (just past the marker); None when it is not a call after all.
RegionReader = Callable[[str, int, bool], MarkedRegion | None]


def scan_marked_calls(
    text: str, marker: str, read_region: RegionReader, final: bool, read_on: bool = False
) -> Scan:
    """The scan of an output whose calls each follow `marker`, with text before, between and after.
    read_on: the scan keeps where the output ends (`Scan.end`: text after the calls, or a region's
    own `open_end`), for a family whose regions, once read closed or as no call, stay so as the output
    grows."""
    builder = ScanBuilder(final)
    pos = 0
    while (at := text.find(marker, pos)) >= 0:
        region = read_region(text, at + len(marker), final)
        if region is None:  # not a call after all: the rest is text
            builder.text(text[pos:])
            return builder.build(builder.text_end(()) if read_on else None)
        builder.text(text[pos:at])
        for call in region.calls:
            builder.call(call)
        if region.end is None:
            return builder.build(region.open_end if read_on else None)
        pos = region.end
    builder.tail(text[pos:], (marker,))
    return builder.build(builder.text_end((marker,)) if read_on else None)


def partial_marker_length(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins one of `markers`."""
    longest = 0
    for marker in markers:
        # Such an end starts at the marker's first character, among the last len(marker) - 1; the
        # earliest one that begins it is the longest.
        at = text.find(marker[:1], max(len(text) - len(marker) + 1, 0))
        while at >= 0 and len(text) - at > longest:
            if marker.startswith(text[at:]):
                longest = len(text) - at
                break
            at = text.find(marker[:1], at + 1)
    return longest
