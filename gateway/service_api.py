"""``/api/{service}/…``: the control-plane services' APIs, proxied.

The services authenticate and authorise their callers themselves, so the caller's credential
goes through unchanged; the gateway adds Kong's forwarding and latency headers.
"""

from __future__ import annotations

import time

import httpx
from starlette.types import Receive, Scope, Send

from gateway.admission import Refusal
from gateway.http import (
    BodyError,
    ClientGone,
    Headers,
    body_limits,
    read_body,
    upstream_headers,
)
from gateway.kong.proxy import VIA, body_refusal, kong_error_body, send_kong_error
from gateway.relay import Outcome, forward
from libs.common.settings import Settings

SERVICES = ("authz", "catalog", "approval", "inference", "metering")
# What the public proxy forwards to a service: its versioned API, nothing else. A service's
# probes, /metrics (token totals by project and model), /openapi.json and /docs are for the
# operator's network (Prometheus scrapes the services directly), so they answer 404 here like
# any path no route matches; an allow-list, so a new unversioned route is private by default.
PUBLIC_PREFIX = "v1/"


class ServiceApiProxy:
    def __init__(self, *, http: httpx.AsyncClient, settings: Settings) -> None:
        self.http = http
        self.body = body_limits(settings)
        self.urls = {name: str(getattr(settings, f"{name}_url")).rstrip("/") for name in SERVICES}

    async def __call__(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        started = time.perf_counter()
        service, _, rest = scope["path"][len("/api/") :].partition("/")
        base = self.urls.get(service)
        if base is None or not rest.startswith(PUBLIC_PREFIX):
            error = Refusal(404, "no Route matched with those values")
            await send_kong_error(send, error, rid, started)
            return
        try:
            body = await read_body(scope, receive, self.body)
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
        request = self.http.build_request(scope["method"], url, content=body, headers=headers)
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
            self.http, receive, send, request, extra_headers=extra, error_body=kong_error_body
        )
