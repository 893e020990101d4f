"""What an MCP server may advertise through the gateway: the tools its catalog version lists.

A ``tools/list`` answer passes through a ``ToolsFilter`` that drops every tool the catalog does
not list, in a JSON answer and in an SSE one (each event's JSON-RPC message on its own), so a
client never learns of a tool it could not call. A catalog version listing no tools advertises
none (fail closed). Only the answers to the request's own ``tools/list`` ids are touched.

A call of a tool that may change something (``read_write``, ``execute``) is audited with its
arguments, secrets redacted by key name (``redacted``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Hashable
from typing import Any

from gateway.admission import rpc_error

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# A JSON answer larger than this is not relayed at all (it cannot be checked whole).
MAX_JSON_BYTES = 16 * 1024 * 1024


def list_ids(messages: list[dict[str, Any]]) -> set[Hashable]:
    """The ids of the ``tools/list`` requests among ``messages``."""
    return {
        m["id"]
        for m in messages
        if m.get("method") == "tools/list" and isinstance(m.get("id"), (str, int))
    }


class ToolsFilter:
    """Rewrites a relayed body (gateway/relay.py ``Rewrite``): JSON whole, SSE event by event."""

    def __init__(self, ids: set[Hashable], allowed: Collection[str], *, sse: bool) -> None:
        self.ids = ids
        self.allowed = allowed
        self.sse = sse
        self.removed = 0  # tools kept from the client
        self._buffer = b""
        self._overflow = False

    def feed(self, chunk: bytes) -> bytes:
        if self._overflow:
            return b""
        self._buffer += chunk
        if not self.sse:
            if len(self._buffer) > MAX_JSON_BYTES:
                self._overflow, self._buffer = True, b""
            return b""
        out: list[bytes] = []
        start = 0
        for match in _BOUNDARY.finditer(self._buffer):
            out.append(self._event(self._buffer[start : match.end()]))
            start = match.end()
        self._buffer = self._buffer[start:]
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        if self._overflow:
            too_large = "the MCP server's answer is too large for the gateway to check"
            return json.dumps(rpc_error(too_large, id_=min(self.ids, key=str))).encode()
        if self.sse:
            return self._event(rest) if rest else b""
        try:
            parsed = json.loads(rest)
        except (ValueError, RecursionError):
            return rest  # not JSON-RPC: nothing to filter, the client will fail on it itself
        return json.dumps(self._message(parsed)).encode() if self._touches(parsed) else rest

    def _event(self, raw: bytes) -> bytes:
        lines = raw.splitlines()
        data = [line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:")]
        if not data:
            return raw
        try:
            parsed = json.loads(b"\n".join(data))
        except (ValueError, RecursionError):
            return raw
        if not self._touches(parsed):
            return raw
        kept = [line for line in lines if line and not line.startswith(b"data:")]
        message = json.dumps(self._message(parsed)).encode()
        return b"\n".join([*kept, b"data: " + message]) + b"\n\n"

    def _touches(self, parsed: Any) -> bool:
        items = parsed if isinstance(parsed, list) else [parsed]
        return any(self._wanted(m) for m in items)

    def _wanted(self, message: Any) -> bool:
        if not isinstance(message, dict):
            return False
        id_ = message.get("id")
        return isinstance(id_, (str, int)) and id_ in self.ids

    def _message(self, parsed: Any) -> Any:
        if isinstance(parsed, list):
            return [self._message(m) for m in parsed]
        if not self._wanted(parsed):
            return parsed
        result = parsed.get("result")
        if isinstance(result, dict) and isinstance(result.get("tools"), list):
            tools = result["tools"]
            kept = [t for t in tools if isinstance(t, dict) and t.get("name") in self.allowed]
            self.removed += len(tools) - len(kept)
            parsed = {**parsed, "result": {**result, "tools": kept}}
        return parsed


# An audited call's arguments are kept up to this size (as JSON); larger ones by size only.
MAX_AUDITED_BYTES = 4096
REDACTED = "[redacted]"


def redacted(value: Any, fragments: Collection[str], depth: int = 0) -> Any:
    """``value`` with every mapping key that names a secret (contains a fragment, any case)
    replaced by ``[redacted]``, at any depth; what is nested too deep is dropped."""
    if depth > 8:
        return REDACTED
    if isinstance(value, dict):
        return {
            str(k): REDACTED
            if any(f in str(k).lower() for f in fragments)
            else redacted(v, fragments, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redacted(v, fragments, depth + 1) for v in value]
    return value


def audited_arguments(arguments: Any, fragments: Collection[str]) -> dict[str, Any]:
    """What the audit log keeps of a tool call's arguments."""
    clean = redacted(arguments, fragments)
    size = len(json.dumps(clean, default=str))
    if size > MAX_AUDITED_BYTES:
        return {"arguments_bytes": size}
    return {"arguments": clean}
