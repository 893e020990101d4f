"""Small ASGI helpers for the proxy: it speaks ASGI directly, because every microsecond a
framework spends routing and validating is added to every model call."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from libs.common.settings import Settings

Headers = list[tuple[bytes, bytes]]

# Never forwarded between hops (RFC 9110 §7.6.1), nor the client's credentials to an upstream.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
CREDENTIAL_HEADERS = frozenset({b"authorization", b"apikey", b"x-api-key", b"cookie"})


class BodyError(Exception):
    """A request body the gateway refuses to read further; ``status`` says why (413, 408)."""

    status = 400


class BodyTooLarge(BodyError):
    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")
        self.limit = limit


class BodyTimeout(BodyError):
    """The body did not arrive in time: a client trickling bytes holds a connection and a task,
    so the whole body has one deadline, however busy the socket looks."""

    status = 408

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive within {seconds:g} seconds")


class ClientGone(Exception):
    """The client disconnected before the request body was complete."""


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


# Sent with a refusal that leaves the request body unread: the connection cannot be reused.
CLOSE: Headers = [(b"connection", b"close")]


def bad_path(path: str) -> str | None:
    """Why a (percent-decoded) request path is refused, or None. The proxies join paths into
    upstream URLs: a control character (NUL…) is not a URL, ``?``/``#`` would start a query or
    fragment the client did not send, and a ``.``/``..`` segment would climb out of the prefix
    a route maps (``/mcp/x/../../admin``) once the URL is normalised."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "the request path contains a control character"
    if "?" in path or "#" in path:
        return "the request path contains an encoded '?' or '#'"
    if any(segment in (".", "..") for segment in path.split("/")):
        return "the request path contains a '.' or '..' segment"
    return None


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """How much of a request body the proxy reads (``STEWARD_GATEWAY_MAX_REQUEST_BYTES``), and
    how long it waits for all of it (``STEWARD_GATEWAY_BODY_TIMEOUT_SECONDS``)."""

    max_bytes: int
    seconds: float


def body_limits(settings: Settings) -> BodyLimits:
    return BodyLimits(settings.gateway_max_request_bytes, settings.gateway_body_timeout_seconds)


async def read_body(scope: Scope, receive: Receive, limits: BodyLimits) -> bytes:
    """The whole request body, refusing more than ``max_bytes`` before reading them, and a
    body that takes longer than ``seconds`` in all (BodyTooLarge, BodyTimeout)."""
    limit, seconds = limits.max_bytes, limits.seconds
    length = header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge(limit)
    try:
        async with asyncio.timeout(seconds):
            return await _read(receive, limit)
    except TimeoutError:
        raise BodyTimeout(seconds) from None


async def _read(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            else:
                chunks.clear()  # past the cap: the rest is read and dropped (below)
        if not message.get("more_body", False):
            break
    if size > limit:
        # Only now: a client still sending when the 413 and the close come may never read
        # them (its unread data makes the close a reset), so the rest of a body that outgrew
        # the cap is drained, within the body's deadline, before the refusal.
        raise BodyTooLarge(limit)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    out: Headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, payload: Any, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send_bytes(send, status, body, b"application/json", headers)


def openai_error(
    message: str, type_: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object, which the OpenAI SDKs turn into typed exceptions."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def upstream_headers(
    scope: Scope, extra: Mapping[str, str] | None = None, *, keep_credentials: bool = False
) -> dict[str, str]:
    """The client's headers minus hop-by-hop and (unless asked) credential headers."""
    out: dict[str, str] = {}
    for key, value in scope["headers"]:
        if key in HOP_BY_HOP or (not keep_credentials and key in CREDENTIAL_HEADERS):
            continue
        out[key.decode("latin-1")] = value.decode("latin-1")
    if extra:
        out.update(extra)
    return out


def upstream_header_list(
    scope: Scope, extra: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """The client's headers for a model upstream: no hop-by-hop, no credential, no compression
    (the gateway reads the answer for usage), plus ``extra``."""
    out = [
        (key, value)
        for key, value in scope["headers"]
        if key not in HOP_BY_HOP and key not in CREDENTIAL_HEADERS and key != b"accept-encoding"
    ]
    out.append((b"accept-encoding", b"identity"))
    out.extend(extra)
    return out


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> Headers:
    return [(k.lower(), v) for k, v in raw if k.lower() not in HOP_BY_HOP]


async def wait_disconnect(receive: Receive) -> Message:
    """Block until the client goes away (the body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return message
