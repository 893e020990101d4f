"""What a model (``/v1``) or MCP (``/mcp``) upstream's response may carry to the client.

Upstreams are not trusted with the client's side of the gateway: a model server or an MCP server
can set cookies on the gateway's origin, name its software and internal hosts in headers,
redirect to an internal service, or answer a 500 with a traceback holding a password. So:

- **Headers** reach the client only from an allow-list per kind of upstream (below); everything
  else — ``Set-Cookie``, ``Server``, ``Location``, ``X-*`` internals, the upstream account's
  ``x-ratelimit-*`` and ``openai-organization`` — stays behind. The gateway adds its own
  ``x-request-id`` and ``RateLimit-*`` itself, so the upstream's are not relayed either.
- **Only 2xx answers are relayed as they came.** A redirect (3xx) is never followed nor passed
  on: the client gets 502. A 5xx body is logged (truncated) and the client gets a generic error
  with the upstream's status. A 4xx body is useful to the client (a context-length error says
  what to fix), so its documented fields are kept — re-serialised from the parsed JSON, never
  the raw bytes: ``error.message/type/code/param`` of an OpenAI error object, ``id`` and
  ``error.code/message`` of a JSON-RPC error (``error.data`` may hold anything: dropped). A 4xx
  body of another shape gets a generic error too.

One policy, two renderings (OpenAI error object, JSON-RPC error); ``gateway/inference.py`` (the
pooled model client) and ``gateway/relay.py`` (MCP over httpx) both apply it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gateway.http import Headers, openai_error

log = logging.getLogger("steward.gateway.egress")

LOGGED_BYTES = 2048  # of an upstream error body, in the gateway's log
READ_BYTES = 64 * 1024  # at most this much of an upstream error body is read
MAX_MESSAGE = 2000  # characters of an upstream 4xx message kept for the client
JSON = b"application/json"

# Describe the bytes as relayed; caching; when to retry.
_COMMON = frozenset({b"content-type", b"content-encoding", b"cache-control", b"retry-after"})
# The model path re-frames bodies (content-length is the gateway's own). OpenAI's processing
# headers are timing and API version; its organisation/project headers name the upstream account.
MODEL_HEADERS = _COMMON | {b"openai-processing-ms", b"openai-version"}
# MCP bodies go through byte for byte (content-length stays true); the session and protocol
# version headers are the protocol itself (streamable HTTP).
MCP_HEADERS = _COMMON | {b"content-length", b"mcp-session-id", b"mcp-protocol-version"}
# An error body the gateway rewrote: only what still applies to it.
_ERROR_HEADERS = frozenset({b"retry-after"})

JSONRPC_INTERNAL = -32603
JSONRPC_INVALID_REQUEST = -32600


@dataclass(frozen=True, slots=True)
class Egress:
    """The response policy for one kind of upstream."""

    area: str  # for the log: "model", "mcp"
    allowed: frozenset[bytes]
    # (status, message) → a generic error body in the area's protocol
    generic: Callable[[int, str], bytes]
    # a 4xx body, parsed → the fields worth keeping, re-serialised (None: nothing kept)
    keep: Callable[[Any], bytes | None]

    def headers(self, raw: Iterable[tuple[bytes, bytes]]) -> Headers:
        """The upstream's headers a client may see (a 2xx answer relayed as it came)."""
        return [(k.lower(), v) for k, v in raw if k.lower() in self.allowed]

    @staticmethod
    def relayed(status: int) -> bool:
        """Only a 2xx answer goes to the client as it came; any other is ``replaced``."""
        return 200 <= status < 300

    @staticmethod
    def error_headers(raw: Iterable[tuple[bytes, bytes]], body: bytes) -> Headers:
        kept = [(k.lower(), v) for k, v in raw if k.lower() in _ERROR_HEADERS]
        return [(b"content-type", JSON), (b"content-length", str(len(body)).encode()), *kept]

    def replaced(self, status: int, body: bytes, upstream: str) -> tuple[int, bytes]:
        """The status and body a client gets for an upstream answer that is not ``relayed``."""
        if not 400 <= status < 600:
            log.warning(
                "upstream answered %s, which is not relayed",
                status,
                extra={"area": self.area, "upstream": upstream},
            )
            message = (
                f"the upstream answered with status {status}, which the gateway does not follow"
            )
            return 502, self.generic(502, message)
        if status >= 500:
            log.warning(
                "upstream error %s: %r",
                status,
                body[:LOGGED_BYTES],
                extra={"area": self.area, "upstream": upstream},
            )
            return status, self.generic(status, "the upstream server failed to answer")
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            parsed = None
        kept = self.keep(parsed)
        if kept is None:
            log.info(
                "upstream refusal %s: %r",
                status,
                body[:LOGGED_BYTES],
                extra={"area": self.area, "upstream": upstream},
            )
            return status, self.generic(status, f"the upstream refused the request ({status})")
        return status, kept


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _text(value: Any) -> str | None:
    return value[:MAX_MESSAGE] if isinstance(value, str) else None


def _openai_generic(status: int, message: str) -> bytes:
    type_ = "invalid_request_error" if status < 500 else "server_error"
    if status == 502:
        type_ = "upstream_error"
    return _dumps(openai_error(message, type_))


def _openai_keep(parsed: Any) -> bytes | None:
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return None
    message = _text(error.get("message"))
    if message is None:
        return None
    code = error.get("code")
    return _dumps(
        openai_error(
            message,
            _text(error.get("type")) or "invalid_request_error",
            code=str(code)[:100] if isinstance(code, str | int) else None,
            param=_text(error.get("param")),
        )
    )


def _rpc(code: int, message: str, id_: Any = None) -> bytes:
    return _dumps({"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}})


def _rpc_generic(status: int, message: str) -> bytes:
    return _rpc(JSONRPC_INVALID_REQUEST if status < 500 else JSONRPC_INTERNAL, message)


def _rpc_keep(parsed: Any) -> bytes | None:
    if not isinstance(parsed, dict) or not isinstance(parsed.get("error"), dict):
        return None
    error = parsed["error"]
    code, message = error.get("code"), _text(error.get("message"))
    if not isinstance(code, int) or isinstance(code, bool) or message is None:
        return None
    id_ = parsed.get("id")
    return _rpc(code, message, id_ if isinstance(id_, str | int) else None)


MODEL = Egress("model", MODEL_HEADERS, _openai_generic, _openai_keep)
MCP = Egress("mcp", MCP_HEADERS, _rpc_generic, _rpc_keep)
