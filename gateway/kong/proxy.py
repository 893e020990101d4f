"""Proxying the routes of a Kong declarative config, with Kong's headers both ways.

Upstream gets ``X-Consumer-ID``, ``X-Consumer-Username``, ``X-Consumer-Custom-ID``,
``X-Credential-Identifier``, ``X-Consumer-Groups``, ``X-Kong-Request-Id`` and the
``X-Forwarded-*`` family; the client gets ``X-Kong-Upstream-Latency``, ``X-Kong-Proxy-Latency``,
``X-Kong-Request-Id``, ``Via`` and the rate-limiting headers. Kong's own answers are
``{"message": …}`` bodies.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from opentelemetry import trace
from starlette.types import Receive, Scope, Send

from gateway.admission import Admission, Refusal
from gateway.http import (
    HOP_BY_HOP,
    BodyError,
    BodyLimits,
    BodyTooLarge,
    ClientGone,
    Headers,
    read_body,
)
from gateway.kong.runtime import (
    Identity,
    KongRuntime,
    Match,
    cookies_of,
    join_query,
    split_query,
)
from gateway.kong.schema import RateLimitingConfig
from gateway.relay import Outcome, forward
from gateway.tracing import KNOWN_METHODS

VIA = b"1.1 steward-gateway (kong/3.4-compatible)"
JSON = b"application/json; charset=utf-8"


def kong_error_body(status: int, message: str) -> tuple[bytes, bytes]:
    return json.dumps({"message": message}).encode(), JSON


async def send_kong_error(send: Send, error: Refusal, rid: bytes, started: float) -> None:
    body = error.kong()
    headers: Headers = [
        (b"content-type", JSON),
        (b"content-length", str(len(body)).encode()),
        (b"x-kong-request-id", rid),
        (b"x-kong-response-latency", _ms(time.perf_counter() - started)),
        *error.headers,
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def body_refusal(exc: BodyError) -> Refusal:
    """Kong's words for a body it will not read (nginx's ``client_max_body_size`` and
    ``client_body_timeout``)."""
    message = "Request size limit exceeded" if isinstance(exc, BodyTooLarge) else "Request timeout"
    # The rest of the body stays unread: the connection cannot carry another request.
    return Refusal(exc.status, message, headers={"connection": "close"})


def _ms(seconds: float) -> bytes:
    return str(int(seconds * 1000)).encode()


class KongProxy:
    def __init__(
        self,
        *,
        runtime: Callable[[], KongRuntime | None],
        admission: Admission,
        http: httpx.AsyncClient,
        body: BodyLimits,
        traced: bool,
    ) -> None:
        # The config in force: POST /config on the admin listener replaces it whole.
        self.runtime = runtime
        self.admission = admission
        self.http = http
        self.body = body
        self.traced = traced

    async def __call__(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        started = time.perf_counter()
        runtime = self.runtime()
        try:
            if runtime is None:
                raise Refusal(404, "no Route matched with those values")
            await self._handle(runtime, scope, receive, send, rid, started)
        except Refusal as error:
            await send_kong_error(send, error, rid, started)

    async def _handle(
        self,
        runtime: KongRuntime,
        scope: Scope,
        receive: Receive,
        send: Send,
        rid: bytes,
        started: float,
    ) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path: str = scope["path"]
        match = runtime.match(scope["method"], headers.get("host", ""), path)
        if match is None:
            raise Refusal(404, "no Route matched with those values")
        route_id, service_id = match.route["id"], match.service["id"]
        if self.traced:
            _name_span(trace.get_current_span(), scope["method"], match)
        query = split_query(scope.get("query_string", b""))
        identity = Identity()
        for name in ("jwt", "key-auth"):
            plugin = runtime.plugin(name, route_id, service_id)
            if plugin is None:
                continue
            if scope["method"] == "OPTIONS" and not plugin["config"].get("run_on_preflight", True):
                continue
            if name == "jwt":
                identity = runtime.jwt_auth(
                    plugin["config"], headers, query, cookies_of(headers.get("cookie"))
                )
            else:
                identity = runtime.key_auth(plugin["config"], headers, query)
        consumer_id = identity.consumer["id"] if identity.consumer else None
        acl = runtime.plugin("acl", route_id, service_id)
        if acl is not None:
            runtime.acl(acl["config"], identity)
        client_headers: Headers = []
        limiter = runtime.plugin("rate-limiting", route_id, service_id, consumer_id)
        if limiter is not None:
            config = RateLimitingConfig.model_validate(limiter["config"])
            allowed, rate_headers = runtime.counters.check(
                limiter["id"],
                _limit_key(config, identity, scope, headers, match.service, path),
                config,
                time.time(),
            )
            if config.hide_client_headers:
                rate_headers = {"Retry-After": rate_headers["Retry-After"]} if not allowed else {}
            if not allowed:
                raise Refusal(int(config.error_code), config.error_message, headers=rate_headers)
            client_headers += [(k.lower().encode(), v.encode()) for k, v in rate_headers.items()]
        quota = runtime.plugin("steward-quota", route_id, service_id, consumer_id)
        if quota is not None:
            consumer = identity.consumer or {}
            try:
                reservation = self.admission.reserve(
                    project=str(
                        quota["config"].get("project") or consumer.get("username") or "anonymous"
                    ),
                    credential_id=identity.credential_id or "",
                    model=str(match.service.get("name") or service_id),
                    # A Kong route's call has no token estimate; it costs at least one, so a
                    # spent budget refuses it. Its real usage reaches metering as usage events.
                    input_tokens=1,
                    output_tokens=0,
                )
            except Refusal as refused:  # in Kong's words
                raise Refusal(429, "Token quota exceeded", headers=refused.headers) from None
            # Its usage event, if any, comes from elsewhere (a Kong plugin): nothing to count here.
            self.admission.quota.settle(reservation, input_tokens=0, output_tokens=0, requests=0)
        try:
            body = await read_body(scope, receive, self.body)
        except BodyError as exc:
            raise body_refusal(exc) from None
        except ClientGone:
            return
        show_groups = acl is None or not acl["config"].get("hide_groups_header", False)
        request = self._upstream_request(
            scope, headers, query, match, identity, rid, body, show_groups
        )
        proxy_latency = time.perf_counter() - started

        def response_extra(outcome: Outcome) -> Headers:
            return [
                *client_headers,
                (b"x-kong-upstream-latency", _ms(outcome.upstream_latency or 0)),
                (b"x-kong-proxy-latency", _ms(proxy_latency)),
                (b"x-kong-request-id", rid),
                (b"via", VIA),
            ]

        await forward(
            self.http,
            receive,
            send,
            request,
            extra_headers=response_extra,
            error_body=kong_error_body,
        )

    def _upstream_request(
        self,
        scope: Scope,
        headers: dict[str, str],
        query: dict[str, str],
        match: Any,
        identity: Identity,
        rid: bytes,
        body: bytes,
        show_groups: bool,
    ) -> httpx.Request:
        route, service = match.route, match.service
        path: str = scope["path"]
        rest = path[len(match.matched) :] if route.get("strip_path", True) else path
        base = service.get("path") or "/"
        upstream_path = base.rstrip("/") + "/" + rest.lstrip("/") if rest else base
        scheme = "https" if service["protocol"] in ("https", "grpcs", "tls") else "http"
        url = f"{scheme}://{service['host']}:{service['port']}{upstream_path}"
        if query:
            url += "?" + join_query(query)
        client = scope.get("client") or ("", 0)
        server = scope.get("server") or ("", 0)
        out = {
            k: v
            for k, v in headers.items()
            if k.encode() not in HOP_BY_HOP or (k == "host" and route.get("preserve_host"))
        }
        forwarded_for = headers.get("x-forwarded-for")
        out.update(
            {
                "x-forwarded-for": f"{forwarded_for}, {client[0]}" if forwarded_for else client[0],
                "x-forwarded-proto": scope.get("scheme", "http"),
                "x-forwarded-host": headers.get("host", "").split(":", 1)[0],
                "x-forwarded-port": str(server[1]),
                "x-forwarded-path": path,
                "x-real-ip": client[0],
                "x-kong-request-id": rid.decode(),
            }
        )
        if route.get("strip_path", True) and match.matched:
            out["x-forwarded-prefix"] = match.matched
        for stale in (
            "x-consumer-id",
            "x-consumer-username",
            "x-consumer-custom-id",
            "x-credential-identifier",
            "x-consumer-groups",
            "x-anonymous-consumer",
        ):
            out.pop(stale, None)  # a client may not claim an identity itself
        consumer = identity.consumer
        if consumer is not None:
            out["x-consumer-id"] = consumer["id"]
            if consumer.get("username"):
                out["x-consumer-username"] = consumer["username"]
            if consumer.get("custom_id"):
                out["x-consumer-custom-id"] = consumer["custom_id"]
            if identity.credential_id:
                out["x-credential-identifier"] = identity.credential_id
            if identity.anonymous:
                out["x-anonymous-consumer"] = "true"
        if identity.groups and show_groups:
            out["x-consumer-groups"] = ", ".join(identity.groups)
        timeout = httpx.Timeout(
            connect=service["connect_timeout"] / 1000,
            read=service["read_timeout"] / 1000,
            write=service["write_timeout"] / 1000,
            pool=service["connect_timeout"] / 1000,
        )
        return self.http.build_request(
            scope["method"], url, content=body, headers=out, timeout=timeout
        )


def _name_span(span: trace.Span, method: str, match: Match) -> None:
    """The request's span, named after the Kong route: its path prefix (a regex match would
    be the concrete path, so it is left out) and, as attributes, the route and service."""
    if not span.is_recording():
        return
    route, service = match.route, match.service
    span.set_attributes(
        {
            "steward.kong.route": str(route.get("name") or route["id"]),
            "steward.kong.service": str(service.get("name") or service["id"]),
        }
    )
    if match.matched and match.matched in match.compiled.prefixes:
        span.set_attribute("http.route", match.matched)
        span.update_name(f"{method if method in KNOWN_METHODS else 'HTTP'} {match.matched}")


def _limit_key(
    config: RateLimitingConfig,
    identity: Identity,
    scope: Scope,
    headers: dict[str, str],
    service: dict[str, Any],
    path: str,
) -> str:
    """What the limit counts by (Kong falls back to the client IP when it has no consumer)."""
    ip = (scope.get("client") or ("", 0))[0]
    if config.limit_by == "consumer" and identity.consumer is not None:
        return "consumer:" + str(identity.consumer["id"])
    if config.limit_by == "credential" and identity.credential_id is not None:
        return "credential:" + identity.credential_id
    if config.limit_by == "service":
        return "service:" + str(service["id"])
    if config.limit_by == "header" and config.header_name:
        return "header:" + headers.get(config.header_name.lower(), "")
    if config.limit_by == "path" and config.path:
        return "path:" + config.path
    return "ip:" + str(ip)
