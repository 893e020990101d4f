"""Relaying an OpenAI-style SSE stream event by event, reading what metering needs on the way.

Nothing is held back longer than it takes for the event it belongs to to end: each upstream
chunk is split at event boundaries, the complete events go to the client at once, and only an
unfinished tail waits for the next chunk. The relay notes the first content delta (time to first
token), the usage chunk (and drops it when the client did not ask for one), the text length (for
an estimate when no usage comes) or the text itself (for the model's tokenizer), and whether the
stream ended with ``[DONE]``.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# The generated text of a chunk, read without parsing it (used once the first token was seen).
_TEXT = re.compile(rb'"(?:content|text)":\s*"((?:[^"\\]|\\.)*)"')
DONE = b"[DONE]"


def event_data(raw: bytes) -> bytes | None:
    """The ``data`` field of one SSE event (joined lines), or None when it has none."""
    if raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.find(b"\n") == len(raw) - 2:
        return raw[6:-2]  # the usual shape: one data line, then the blank line
    data: list[bytes] = []
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(data) if data else None


class StreamRelay:
    """Feed upstream chunks in, get the bytes to send the client out."""

    def __init__(self, *, strip_usage: bool, keep_text: bool = False) -> None:
        self.strip_usage = strip_usage
        # The generated text itself, for counting with the model's tokenizer: JSON-escaped
        # pieces (as the fast path finds them) or decoded ones.
        self._text: list[bytes | str] | None = [] if keep_text else None
        self._tail = b""
        self.first_content = False  # set by feed() the first time a content delta passes
        self.usage: dict[str, Any] | None = None
        self.chars = 0
        self.done = False
        self.malformed = 0
        self.upstream_error: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        if (
            not self._tail
            and chunk.endswith(b"\n\n")
            and chunk.find(b"\n\n") == len(chunk) - 2
            and b"\r" not in chunk
        ):
            return chunk if self._keep(chunk) else b""  # exactly one whole event: most chunks
        buffer = self._tail + chunk if self._tail else chunk
        out: list[bytes] = []
        start = 0
        for match in _BOUNDARY.finditer(buffer):
            end = match.end()
            raw = buffer[start:end]
            start = end
            if self._keep(raw):
                out.append(raw)
        self._tail = buffer[start:]
        return b"".join(out)

    def text(self) -> str:
        """The text relayed so far (kept only when asked for)."""
        parts: list[str] = []
        for part in self._text or ():
            if isinstance(part, str):
                parts.append(part)
                continue
            try:
                parts.append(json.loads(b'"' + part + b'"'))
            except ValueError:  # a piece the regex cut oddly: count its bytes as text
                parts.append(part.decode("utf-8", "replace"))
        return "".join(parts)

    def flush(self) -> bytes:
        """What is left when the upstream closed mid-event (sent as is)."""
        tail, self._tail = self._tail, b""
        if tail:
            self._keep(tail)
        return tail

    def _keep(self, raw: bytes) -> bool:
        data = event_data(raw)
        if data is None:
            return True  # comments, retry hints, keep-alives
        if data == DONE:
            self.done = True
            return True
        if self.first_content and b'"usage"' not in data and b'"error"' not in data:
            # The common case, once the first token went by: only the text length is needed
            # (for an estimate), and a regex finds it several times faster than a JSON parse.
            for match in _TEXT.finditer(data):
                self.chars += len(match.group(1))
                if self._text is not None:
                    self._text.append(match.group(1))
            return True
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            self.malformed += 1
            return True
        if not isinstance(event, dict):
            self.malformed += 1
            return True
        if "error" in event and isinstance(event["error"], dict):
            self.upstream_error = event["error"]
            return True
        choices = event.get("choices")
        if choices:
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(text, str) and text:
                    self.chars += len(text)
                    self.first_content = True
                    if self._text is not None:
                        self._text.append(text)
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            if self.strip_usage and not choices:
                return False  # the chunk we asked for on the client's behalf
        return True
