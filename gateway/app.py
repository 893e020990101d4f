"""The gateway's composition root: its two servers, and which proxy serves which path.

One process, one event loop, two listeners: the proxy (``/v1``, ``/mcp``, ``/api``, Kong routes)
and the admin API (Kong-compatible ``/config``, ``/services``…, plus probes and metrics). Both
share the state gateway/state.py builds; each proxy is handed only the parts it uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.admission import INVALID_REQUEST, Refusal, rpc_error
from gateway.console import console
from gateway.http import bad_path, body_limits, openai_error, send_json
from gateway.inference import ENDPOINTS, InferenceProxy
from gateway.kong.proxy import KongProxy, send_kong_error
from gateway.listener import guarded_protocol
from gateway.mcp import WELL_KNOWN, McpProxy
from gateway.service_api import SERVICES, ServiceApiProxy
from gateway.state import Gateway
from gateway.tracing import KNOWN_METHODS, extract
from libs.common.db import new_id
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
        traced = gateway.tracer is not None
        settings = gateway.settings
        self.inference = InferenceProxy(
            admission=gateway.admission,
            routes=gateway.routes,
            upstream=gateway.upstream,
            usage=gateway.usage,
            tokenizers=gateway.tokenizers,
            settings=settings,
            traced=traced,
        )
        self.mcp = McpProxy(
            admission=gateway.admission,
            routes=gateway.routes,
            http=gateway.http,
            guarded_http=gateway.guarded_http,
            public_url=settings.gateway_public_url,
            issuer=settings.oidc_issuer,
            redact=settings.gateway_audit_redact_keys,
            usage=gateway.usage,
            body=body_limits(settings),
            traced=traced,
        )
        self.api = ServiceApiProxy(http=gateway.http, settings=settings)
        self.kong = KongProxy(
            runtime=lambda: gateway.kong,
            admission=gateway.admission,
            http=gateway.http,
            body=body_limits(settings),
            traced=traced,
        )
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
            elif path.startswith("/mcp/") or path == "/mcp":
                area = "mcp"
                await self.mcp(scope, receive, send_counted, rid)
            elif path.startswith(WELL_KNOWN):
                area = "mcp"
                await self.mcp.resource_metadata(scope, send_counted, rid)
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
        await send_kong_error(send, Refusal(400, reason), rid, time.perf_counter())


def _traced(path: str) -> bool:
    """Probes and the console's static files are not worth a span."""
    return path not in PROBES and not (path == "/console" or path.startswith("/console/"))


def route_template(path: str) -> str | None:
    """The low-cardinality route of a proxied path, for span names (None: not known here)."""
    if path.startswith("/v1/"):
        if path in ENDPOINTS or path == "/v1/models":
            return path
        return "/v1/models/{model}" if path.startswith("/v1/models/") else None
    if path in ("/mcp", "/mcp/"):
        return "/mcp/"
    if path.startswith("/mcp/"):
        return "/mcp/{server}/{path}"
    if path.startswith(WELL_KNOWN):
        return WELL_KNOWN + "/{path}"
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


def shared_socket(host: str, port: int) -> socket.socket:
    """A listening socket other processes may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


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
    worker = settings.gateway_worker
    servers = [
        _Server(server_config(ProxyApp(gateway), settings, settings.gateway_proxy_port)),
        _Server(
            server_config(
                create_admin_app(gateway), settings, settings.gateway_admin_port + (worker or 0)
            )
        ),
    ]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    try:
        if worker is None:
            await asyncio.gather(*(server.serve() for server in servers))
        else:
            # A worker shares the proxy port with its siblings (SO_REUSEPORT: the kernel spreads
            # the connections over them); its admin port is its own.
            proxy = shared_socket(settings.host, settings.gateway_proxy_port)
            await asyncio.gather(servers[0].serve(sockets=[proxy]), servers[1].serve())
    finally:
        await gateway.stop()
