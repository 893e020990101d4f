"""Small ASGI helpers for the proxy: it speaks ASGI directly, because every microsecond a
framework spends routing and validating is added to every model call."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.types import Message, Receive, Scope, Send

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


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")
        self.limit = limit


class ClientGone(Exception):
    """The client disconnected before the request body was complete."""


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes before reading them."""
    length = header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
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
