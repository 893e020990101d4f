"""Plain proxying for MCP, ``/api`` and Kong routes: bytes through, as they come, nothing parsed.

The response streams straight back (SSE included); a client that leaves closes the upstream
response; connect errors and timeouts become the caller's own error body.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from starlette.types import Receive, Send

from gateway.calls import until_disconnect
from gateway.egress import READ_BYTES, Egress
from gateway.http import Headers, response_headers

# (status, message) → (body, content type): each area words its own errors.
ErrorBody = Callable[[int, str], tuple[bytes, bytes]]


# What no longer describes a rewritten body (it is decoded, and its length changes).
_REWRITTEN = frozenset({b"content-length", b"content-encoding"})


class Rewrite(Protocol):
    """Changes a relayed 2xx body on its way (chunks in, bytes out; the rest at the end)."""

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


@dataclass(slots=True)
class Outcome:
    status: int = 0
    error_type: str | None = None
    disconnected: bool = False
    started: bool = False  # the response headers went out
    upstream_latency: float | None = None  # seconds from sending to the response headers
    bytes_out: int = 0  # body bytes sent to the client
    response_headers: httpx.Headers = field(default_factory=httpx.Headers)


async def forward(
    client: httpx.AsyncClient,
    receive: Receive,
    send: Send,
    request: httpx.Request,
    *,
    extra_headers: Callable[[Outcome], Headers],
    error_body: ErrorBody,
    egress: Egress | None = None,
    rewrite: Callable[[httpx.Response], Rewrite | None] | None = None,
) -> Outcome:
    """Relay ``request``'s answer. With ``egress`` (an upstream not trusted with the client's
    side, gateway/egress.py) only its allowed headers and 2xx bodies pass; without (``/api``'s
    own services, Kong routes as Kong would), the answer passes minus hop-by-hop headers. With
    ``rewrite``, a 2xx body it returns a rewriter for is changed on its way (its length is then
    unknown: the answer goes chunked)."""
    outcome = Outcome()
    started = False

    async def exchange() -> None:
        nonlocal started
        sent = time.perf_counter()
        response = await client.send(request, stream=True)
        try:
            outcome.upstream_latency = time.perf_counter() - sent
            outcome.status = response.status_code
            outcome.response_headers = response.headers
            if egress is not None and not egress.relayed(response.status_code):
                await _replace(egress, response, request, send, outcome, extra_headers)
                started = outcome.started
                return
            if egress is not None:
                headers = egress.headers(response.headers.raw) + extra_headers(outcome)
            else:
                headers = response_headers(response.headers.raw) + extra_headers(outcome)
            changer = rewrite(response) if rewrite is not None and response.is_success else None
            if changer is not None:
                headers = [(k, v) for k, v in headers if k not in _REWRITTEN]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": headers}
            )
            started = outcome.started = True
            # Decoded (not raw) when rewriting: the rewriter reads the text.
            chunks = response.aiter_bytes() if changer is not None else response.aiter_raw()
            async for chunk in chunks:
                out = changer.feed(chunk) if changer is not None else chunk
                if out:
                    outcome.bytes_out += len(out)
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            tail = changer.flush() if changer is not None else b""
            outcome.bytes_out += len(tail)
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            await response.aclose()

    try:
        outcome.disconnected = await until_disconnect(exchange(), receive)
    except httpx.TimeoutException:
        outcome.error_type = "timeout"
        await _fail(send, started, 504, "The upstream server is timing out", error_body, outcome)
    except httpx.TransportError:
        outcome.error_type = "upstream_unavailable"
        await _fail(
            send,
            started,
            502,
            "An invalid response was received from the upstream server",
            error_body,
            outcome,
        )
    return outcome


async def _replace(
    egress: Egress,
    response: httpx.Response,
    request: httpx.Request,
    send: Send,
    outcome: Outcome,
    extra_headers: Callable[[Outcome], Headers],
) -> None:
    raw = b""
    if response.status_code >= 400:
        async for chunk in response.aiter_bytes():
            raw += chunk
            if len(raw) >= READ_BYTES:
                break
    status, body = egress.replaced(
        response.status_code, raw, str(request.url.copy_with(query=None))
    )
    if response.status_code < 400:
        outcome.error_type = "upstream_redirect"
    outcome.status = status
    headers = egress.error_headers(response.headers.raw, body) + extra_headers(outcome)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    outcome.started = True
    outcome.bytes_out += len(body)
    await send({"type": "http.response.body", "body": body})


async def _fail(
    send: Send, started: bool, status: int, message: str, error_body: ErrorBody, outcome: Outcome
) -> None:
    if started:
        # Headers are out: all that is left is to end the body (the client sees it cut short).
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    outcome.status = status
    body, content_type = error_body(status, message)
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    outcome.bytes_out += len(body)
    await send({"type": "http.response.body", "body": body})
