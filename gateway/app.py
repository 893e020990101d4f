"""The gateway's composition root: what it holds, how it starts and stops, and its two servers.

One process, one event loop, two listeners: the proxy (``/v1``, ``/mcp``, ``/api``, Kong routes)
and the admin API (Kong-compatible ``/config``, ``/services``…, plus probes and metrics). Both
share the replicas and the upstream connection pool built here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api import SERVICES, ApiProxy, console
from gateway.authn import Authenticator
from gateway.http import bad_path, openai_error, send_json
from gateway.inference import ENDPOINTS, InferenceProxy
from gateway.journal import Journal
from gateway.kong.config import load_file, load_state
from gateway.kong.proxy import KongProxy, send_kong_error
from gateway.kong.runtime import KongError, KongRuntime
from gateway.listener import guarded_protocol
from gateway.mcp import INVALID_REQUEST, McpProxy, rpc_error
from gateway.quota import QuotaLedger
from gateway.replica import AuthReplica, CatalogReplica
from gateway.routes import RouteTable
from gateway.spool import Spool
from gateway.sync import Syncer, authz_feed, catalog_feed, inference_feed, metering_feed
from gateway.tracing import KNOWN_METHODS, configured_tracer, extract, inject_httpx
from gateway.upstream import UpstreamPool
from gateway.usage import UsageRecorder
from gateway.vocab import Tokenizers
from libs.common.bus import Bus
from libs.common.clients import AuthzClient, CatalogClient, ServiceClient
from libs.common.db import Clock, new_id, utcnow
from libs.common.netpolicy import policy_from_settings
from libs.common.oidc import verifier_from_settings
from libs.common.service import settle_heap
from libs.common.settings import Settings

log = logging.getLogger("steward.gateway")

_SAFE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._\-]{1,64}$")
# The public port's probes. /metrics is on the admin port only: its series name routes, and a
# route's name carries its project.
PROBES = frozenset({"/healthz", "/readyz"})
REQUESTS = Counter(
    "steward_gateway_requests_total", "Requests received by the proxy", ["area", "status"]
)


class InferenceClient(ServiceClient):
    """Only the routes snapshot is read from inference; endpoint changes arrive as events."""

    service = "inference"


class MeteringClient(ServiceClient):
    """Only the quota snapshot is read from metering; quota changes arrive as events."""

    service = "metering"


@dataclass
class Gateway:
    """Everything the request path reads; built once, shared by both listeners."""

    settings: Settings
    bus: Bus
    auth: AuthReplica
    catalog: CatalogReplica
    routes: RouteTable
    authn: Authenticator
    usage: UsageRecorder
    syncer: Syncer
    http: httpx.AsyncClient
    tokenizers: Tokenizers
    upstream: UpstreamPool = field(
        default_factory=lambda: UpstreamPool(connect_timeout=5.0, read_timeout=300.0)
    )
    quota: QuotaLedger = field(default_factory=QuotaLedger)
    clients: list[ServiceClient] = field(default_factory=list)
    oidc_http: httpx.AsyncClient | None = None
    # The Kong declarative config in force (None: no Kong routes); replaced whole by POST /config.
    kong: KongRuntime | None = None
    # None unless a tracer provider was installed before start (see gateway/tracing.py).
    tracer: trace.Tracer | None = None

    @classmethod
    async def start(cls, settings: Settings, *, clock: Clock = utcnow) -> Gateway:
        """``clock`` is the gateway's "now" for key expiry and quota windows: the wall clock,
        or one a test moves instead of waiting."""
        bus = Bus(settings.nats_url, settings.event_namespace, name="steward-gateway")
        await bus.connect()
        tracer = configured_tracer()
        # Every httpx request made while serving a request (``/api``, ``/mcp``, Kong routes)
        # carries the request's trace context; the service clients (authz's whoami for a new
        # token) inject it themselves.
        hooks: dict[str, list[Any]] = {"request": [inject_httpx]} if tracer is not None else {}
        auth = AuthReplica(settings.pepper, clock)
        catalog = CatalogReplica()
        key = settings.gateway_api_key.get_secret_value() if settings.gateway_api_key else None
        if key is None:
            log.warning("STEWARD_GATEWAY_API_KEY is unset: the replicas cannot be loaded")
        authz_client = AuthzClient(settings.authz_url, timeout=10.0)
        catalog_client = CatalogClient(settings.catalog_url, timeout=10.0)
        inference_client = InferenceClient(settings.inference_url, timeout=10.0)
        routes = RouteTable.from_file(settings.gateway_routes_file)
        metering_client = MeteringClient(settings.metering_url, timeout=10.0)
        # This process's usage events carry its id; its ledger counts its own calls itself.
        quota = QuotaLedger(clock=clock, gateway_id=new_id())
        oidc_http = httpx.AsyncClient(timeout=5.0)
        authn = Authenticator(
            auth, verifier_from_settings(settings, oidc_http), whoami=authz_client.whoami
        )
        syncer = Syncer(
            bus,
            [
                authz_feed(auth, authz_client, key, forget=authn.forget),
                catalog_feed(catalog, catalog_client, key),
                inference_feed(routes, inference_client, key),
                metering_feed(quota, metering_client, key),
            ],
            resync_seconds=settings.gateway_resync_seconds,
            offline_poll_seconds=settings.gateway_offline_poll_seconds,
        )
        limits = httpx.Limits(
            max_connections=settings.gateway_upstream_max_connections,
            max_keepalive_connections=settings.gateway_upstream_max_connections,
            keepalive_expiry=30.0,
        )
        timeout = httpx.Timeout(
            connect=settings.gateway_upstream_connect_timeout_seconds,
            read=settings.gateway_upstream_read_timeout_seconds,
            write=30.0,
            pool=settings.gateway_upstream_connect_timeout_seconds,
        )
        journal = Journal(settings.data_dir / "gateway")
        usage = UsageRecorder(bus, Spool(settings.data_dir / "gateway"), journal=journal)
        # Calls an earlier process was serving when it stopped: metered as interrupted, safe on
        # disk before the journal that remembered them is dropped.
        interrupted = journal.recover()
        if interrupted:
            usage.spool_now(interrupted)
            log.warning(
                "calls interrupted by the last stop metered", extra={"calls": len(interrupted)}
            )
        journal.forget()
        gateway = cls(
            settings=settings,
            bus=bus,
            auth=auth,
            catalog=catalog,
            routes=routes,
            authn=authn,
            usage=usage,
            syncer=syncer,
            http=httpx.AsyncClient(
                limits=limits, timeout=timeout, follow_redirects=False, event_hooks=hooks
            ),
            upstream=UpstreamPool(
                connect_timeout=settings.gateway_upstream_connect_timeout_seconds,
                read_timeout=settings.gateway_upstream_read_timeout_seconds,
                max_idle_per_origin=settings.gateway_upstream_max_connections,
                max_active_per_origin=settings.gateway_upstream_max_connections,
                tracer=tracer,
                policy=await policy_from_settings(settings),
            ),
            tokenizers=Tokenizers(settings.tokenizer_roots),
            clients=[authz_client, catalog_client, inference_client, metering_client],
            quota=quota,
            oidc_http=oidc_http,
            tracer=tracer,
        )
        kong = (
            load_file(settings.gateway_kong_config)
            if settings.gateway_kong_config is not None
            else load_state(settings.data_dir / "gateway")
        )
        gateway.kong = KongRuntime(kong) if kong is not None else None
        await usage.start()
        await syncer.start()
        return gateway

    async def stop(self) -> None:
        await self.syncer.stop()
        await self.usage.stop()
        if self.usage.journal is not None:
            self.usage.journal.close()
        await self.bus.close()
        await self.http.aclose()
        self.upstream.close()
        for client in self.clients:
            await client.aclose()
        if self.oidc_http is not None:
            await self.oidc_http.aclose()

    async def wait_loaded(self, seconds: float) -> None:
        """For tests and start-up scripts: until the authz replica (and catalog's) is loaded."""
        async with asyncio.timeout(seconds):
            while not (self.auth.loaded and self.catalog.loaded):  # noqa: ASYNC110 - rare, polled
                await asyncio.sleep(0.02)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks = {
            "authz_replica": "ok" if self.auth.loaded else "not loaded",
            "catalog_replica": "ok" if self.catalog.loaded else "not loaded",
            "nats": "ok" if self.bus.connected else "unreachable (usage is spooled)",
        }
        # NATS down is degraded, not unready: keys still verify and usage goes to disk.
        ready = self.auth.loaded
        return ready, {
            "status": "ready" if ready else "not ready",
            "checks": checks,
            "replicas": self.syncer.status(),
            "usage": self.usage.status(),
            "keys": self.auth.key_count,
            "entitlements": self.auth.entitlement_count,
        }


def request_id(scope: Scope) -> bytes:
    for key, value in scope["headers"]:
        if key == b"x-request-id" and _SAFE_REQUEST_ID.match(value):
            return bytes(value)
    return new_id().encode()


async def probes(gateway: Gateway, path: str, send: Send) -> bool:
    """``/healthz`` and ``/readyz``; True when ``path`` was one of them."""
    if path == "/healthz":
        await send_json(send, 200, {"status": "ok"})
    elif path == "/readyz":
        ready, body = gateway.readiness()
        await send_json(send, 200 if ready else 503, body)
    else:
        return False
    return True


class ProxyApp:
    """The proxy listener: dispatch by path prefix, no framework in the way."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.inference = InferenceProxy(gateway)
        self.mcp = McpProxy(gateway)
        self.api = ApiProxy(gateway)
        self.kong = KongProxy(gateway)
        # The console's static files: configured, else the repository's console/ (embedded mode).
        bundled = Path(__file__).resolve().parents[1] / "console"
        self.console_dir = gateway.settings.gateway_console_dir or (
            bundled if bundled.is_dir() else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan_noop(receive, send)
            return
        tracer = self.gw.tracer
        if tracer is not None and _traced(scope["path"]):
            await self._traced(tracer, scope, receive, send)
        else:
            await self._dispatch(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Serve the request by its path prefix; the response status (0: none was sent)."""
        path: str = scope["path"]
        rid = request_id(scope)
        status = 0

        async def send_counted(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        area = "other"
        try:
            refused = bad_path(path)
            if refused is not None:
                area = "refused"
                await refuse_path(path, refused, send_counted, rid)
            elif path.startswith("/v1/"):
                area = "v1"
                await self.inference(scope, receive, send_counted, rid)
            elif path.startswith("/mcp/"):
                area = "mcp"
                await self.mcp(scope, receive, send_counted, rid)
            elif path.startswith("/api/"):
                area = "api"
                await self.api(scope, receive, send_counted, rid)
            elif path == "/console" or path.startswith("/console/"):
                area = "console"
                await console(self.console_dir, scope, send_counted)
            elif await probes(self.gw, path, send_counted):
                area = "probe"
            else:
                area = "kong"
                await self.kong(scope, receive, send_counted, rid)
        except Exception as exc:
            log.exception("proxy error", extra={"path": path})
            trace.get_current_span().record_exception(exc)
            if status == 0:
                body = openai_error("internal gateway error", "server_error")
                await send_json(send_counted, 500, body, [(b"x-request-id", rid)])
        finally:
            REQUESTS.labels(area, str(status)).inc()
        return status

    async def _traced(
        self, tracer: trace.Tracer, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """``_dispatch`` inside a SERVER span that continues the caller's trace, if it sent one.

        Named ``{method} {route}`` after the HTTP conventions, the route being a template
        (``/v1/models/{model}``, ``/api/authz/{path}``): never a model, server or id. The areas
        that learn more (the project, the model, a Kong route) add it to this span themselves.
        """
        path: str = scope["path"]
        method: str = scope["method"]
        known = method if method in KNOWN_METHODS else "_OTHER"
        route = route_template(path)
        name = known if known != "_OTHER" else "HTTP"
        attributes: dict[str, str] = {
            "http.request.method": known,
            "url.path": path,
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        if route is not None:
            name = f"{name} {route}"
            attributes["http.route"] = route
        if known != method:
            attributes["http.request.method_original"] = method
        client = scope.get("client")
        if client:
            attributes["client.address"] = client[0]
        parent = extract(scope["headers"])
        span = tracer.start_span(name, parent, SpanKind.SERVER, attributes)
        token = context.attach(trace.set_span_in_context(span, parent))
        status = 0
        try:
            status = await self._dispatch(scope, receive, send)
        finally:
            context.detach(token)
            if status:
                span.set_attribute("http.response.status_code", status)
            if status >= 500 or status == 0:
                # No response at all: the client left first, or the task was cancelled.
                span.set_attribute("error.type", str(status) if status else "incomplete_response")
                span.set_status(StatusCode.ERROR)
            span.end()


async def refuse_path(path: str, reason: str, send: Send, rid: bytes) -> None:
    """400 for a path no proxy may join into an upstream URL, in the words of its area."""
    headers = [(b"x-request-id", rid)]
    if path.startswith("/v1/"):
        await send_json(send, 400, openai_error(reason, "invalid_request_error"), headers)
    elif path.startswith("/mcp/"):
        await send_json(send, 400, rpc_error(reason, INVALID_REQUEST), headers)
    else:
        await send_kong_error(send, KongError(400, reason), rid, time.perf_counter())


def _traced(path: str) -> bool:
    """Probes and the console's static files are not worth a span."""
    return path not in PROBES and not (path == "/console" or path.startswith("/console/"))


def route_template(path: str) -> str | None:
    """The low-cardinality route of a proxied path, for span names (None: not known here)."""
    if path.startswith("/v1/"):
        if path in ENDPOINTS or path == "/v1/models":
            return path
        return "/v1/models/{model}" if path.startswith("/v1/models/") else None
    if path.startswith("/mcp/"):
        return "/mcp/{server}/{path}"
    if path.startswith("/api/"):
        service = path[len("/api/") :].partition("/")[0]
        return f"/api/{service}/{{path}}" if service in SERVICES else None
    return None  # a Kong route names the span once it is matched (gateway/kong/proxy.py)


async def _lifespan_noop(receive: Receive, send: Send) -> None:
    """The gateway's own start/stop happens around the servers, not inside them."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to ``serve`` (two servers share one process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def server_config(app: ASGIApp, settings: Settings, port: int) -> uvicorn.Config:
    """A listener's limits on its clients: the request head within the header timeout
    (gateway/listener.py), the body within the body timeout (read_body: 408), idle kept-alive
    connections closed after ``gateway_keep_alive_seconds``, and past
    ``gateway_max_connections`` open connections (or requests in flight) a 503."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=port,
        loop="none",
        http=guarded_protocol(settings.gateway_header_timeout_seconds),
        lifespan="off",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=settings.gateway_keep_alive_seconds,
        limit_concurrency=settings.gateway_max_connections,
        backlog=4096,
    )


def dump_tasks() -> None:
    """SIGUSR1: print every asyncio task's stack to stderr — what a stuck gateway is waiting on
    (an operator's ``kill -USR1``; the tests send it when a shutdown overruns)."""
    for task in asyncio.all_tasks():
        print(f"--- task {task.get_name()}", file=sys.stderr)
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


async def serve(settings: Settings) -> None:
    """Run the gateway until SIGINT/SIGTERM: both listeners, then a clean shutdown."""
    from gateway.admin import create_admin_app

    gateway = await Gateway.start(settings)
    settle_heap()
    servers = [
        _Server(server_config(ProxyApp(gateway), settings, settings.gateway_proxy_port)),
        _Server(server_config(create_admin_app(gateway), settings, settings.gateway_admin_port)),
    ]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    try:
        await asyncio.gather(*(server.serve() for server in servers))
    finally:
        await gateway.stop()
