"""``/api/{service}/…``: the control-plane APIs behind the gateway, and ``/console/`` files.

The services authenticate and authorise their callers themselves, so the caller's credential
goes through unchanged; the gateway adds Kong's forwarding and latency headers.
"""

from __future__ import annotations

import asyncio
import mimetypes
import time
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.types import Receive, Scope, Send

from gateway.http import (
    BodyError,
    ClientGone,
    Headers,
    read_body,
    send_bytes,
    upstream_headers,
)
from gateway.kong.proxy import VIA, body_refusal, kong_error_body, send_kong_error
from gateway.kong.runtime import KongError
from gateway.relay import Outcome, forward

if TYPE_CHECKING:
    from gateway.app import Gateway

SERVICES = ("authz", "catalog", "approval", "inference", "metering")
# What the public proxy forwards to a service: its versioned API, nothing else. A service's
# probes, /metrics (token totals by project and model), /openapi.json and /docs are for the
# operator's network (Prometheus scrapes the services directly), so they answer 404 here like
# any path no route matches; an allow-list, so a new unversioned route is private by default.
PUBLIC_PREFIX = "v1/"


class ApiProxy:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        settings = gateway.settings
        self.urls = {name: str(getattr(settings, f"{name}_url")).rstrip("/") for name in SERVICES}

    async def __call__(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        started = time.perf_counter()
        service, _, rest = scope["path"][len("/api/") :].partition("/")
        base = self.urls.get(service)
        if base is None or not rest.startswith(PUBLIC_PREFIX):
            error = KongError(404, "no Route matched with those values")
            await send_kong_error(send, error, rid, started)
            return
        try:
            body = await read_body(
                scope,
                receive,
                self.gw.settings.gateway_max_request_bytes,
                self.gw.settings.gateway_body_timeout_seconds,
            )
        except BodyError as exc:
            await send_kong_error(send, body_refusal(exc), rid, started)
            return
        except ClientGone:
            return
        url = f"{base}/{rest}"
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        client = (scope.get("client") or ("", 0))[0]
        headers = upstream_headers(
            scope,
            {
                "x-request-id": rid.decode(),
                "x-forwarded-for": client,
                "x-forwarded-prefix": f"/api/{service}",
                "x-real-ip": client,
            },
            keep_credentials=True,
        )
        request = self.gw.http.build_request(scope["method"], url, content=body, headers=headers)
        proxy_latency = time.perf_counter() - started

        def extra(outcome: Outcome) -> Headers:
            return [
                (b"x-request-id", rid),
                (
                    b"x-kong-upstream-latency",
                    str(int((outcome.upstream_latency or 0) * 1000)).encode(),
                ),
                (b"x-kong-proxy-latency", str(int(proxy_latency * 1000)).encode()),
                (b"via", VIA),
            ]

        await forward(
            self.gw.http, receive, send, request, extra_headers=extra, error_body=kong_error_body
        )


# The console's page carries its own script/style policy in a <meta>; framing and sniffing can
# only be forbidden by headers (clickjacking, MIME confusion), and the key must not leak in a
# Referer.
CONSOLE_HEADERS: Headers = [
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


async def console(directory: Path | None, scope: Scope, send: Send) -> None:
    """Static files of the web console, if one is installed (``STEWARD_GATEWAY_CONSOLE_DIR``)."""
    rel = scope["path"][len("/console") :].lstrip("/") or "index.html"
    found = await asyncio.to_thread(_static, directory, rel) if directory is not None else None
    if found is None:
        await send_bytes(send, 404, b'{"message":"Not found"}', b"application/json")
        return
    body, kind = found
    await send_bytes(send, 200, body, kind.encode(), CONSOLE_HEADERS)


def _static(directory: Path, rel: str) -> tuple[bytes, str] | None:
    root = directory.resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        return None  # outside the console directory, or nothing there
    return target.read_bytes(), mimetypes.guess_type(target.name)[0] or "application/octet-stream"
