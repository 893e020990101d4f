"""MCP over streamable HTTP at ``/mcp/{server}/``: approved servers, approved tools only.

A server is routed when the routes file names it or, with no file and no restart, while its
newest approved catalog version has a streamable-HTTP remote (server.json ``remotes``), or while
an endpoint of a project runs its stdio package (``packages``; only that project sees it). Each POST
carries JSON-RPC; the gateway reads it once to refuse a ``tools/call`` for a tool the catalog does
not list for the server's approved version, relays the request, and streams the answer (JSON or
SSE) back, with ``tools/list`` answers cut down to the catalogued tools (gateway/mcp_tools.py).
A project's entitlement may cover less than the server (tools of some access types, named
tools): what it does not cover is neither listed nor callable, and a grant of named tools alone
does not reach the server's resources or prompts. A call of a tool that may change something
(``read_write``, ``execute``) lands in the audit log with its outcome and its arguments, secrets
redacted (``STEWARD_GATEWAY_AUDIT_REDACT_KEYS``).
``Mcp-Session-Id`` passes through both ways and is bound to the project that opened the session,
so another tenant cannot ride on a session id it learned.

``GET /mcp/`` lists the servers the caller may use, with their URLs and tools. The gateway is an
OAuth 2.1 protected resource as the MCP authorization spec asks: a request without a credential
gets ``401`` with ``WWW-Authenticate: Bearer resource_metadata=…``, and
``/.well-known/oauth-protected-resource[/mcp/{server}/]`` (RFC 9728) names the configured issuer.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Collection, Hashable
from typing import Any

import httpx
from opentelemetry import trace
from starlette.types import Receive, Scope, Send

from gateway.admission import Admission, Refusal, rpc_error
from gateway.calls import Call, finish
from gateway.egress import MCP
from gateway.http import (
    CLOSE,
    BodyError,
    BodyLimits,
    ClientGone,
    Headers,
    read_body,
    send_json,
    upstream_headers,
)
from gateway.mcp_tools import ToolsFilter, audited_arguments, list_ids
from gateway.quota import Reservation, client_headers
from gateway.relay import Outcome, forward
from gateway.routes import RouteTable
from gateway.usage import UsageRecorder
from libs.common.auth import decide
from libs.common.db import utcnow
from libs.common.events.audit import AuditRecorded
from libs.common.events.authz import EntitlementState

WELL_KNOWN = "/.well-known/oauth-protected-resource"
SESSION_HEADER = "mcp-session-id"
# What only reads a server: covered by a grant of read-only tools, not by one of named tools.
READING = frozenset({"resources/read", "prompts/get"})
MAX_SESSIONS = 100_000


def _error_body(status: int, message: str) -> tuple[bytes, bytes]:
    return json.dumps(rpc_error(message)).encode(), b"application/json"


class McpProxy:
    def __init__(
        self,
        *,
        admission: Admission,
        routes: RouteTable,
        http: httpx.AsyncClient,
        guarded_http: httpx.AsyncClient,
        usage: UsageRecorder,
        body: BodyLimits,
        traced: bool,
        public_url: str | None = None,
        issuer: str | None = None,
        redact: Collection[str] = (),
    ) -> None:
        self.admission = admission
        self.routes = routes
        self.http = http
        # For upstreams a publisher named (catalog remotes): the address policy checks each
        # connection (libs/common/netpolicy.py).
        self.guarded_http = guarded_http
        self.usage = usage
        self.body = body
        self.traced = traced
        self.public_url = public_url.rstrip("/") if public_url else None
        self.issuer = issuer
        # Key-name fragments whose values an audited tool call's arguments do not keep.
        self.redact = frozenset(k.lower() for k in redact)
        # session id → project that opened it (bounded, oldest forgotten first)
        self._sessions: OrderedDict[str, str] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        extra: Headers = [(b"x-request-id", rid)]
        try:
            await self._handle(scope, receive, send, extra)
        except Refusal as refusal:
            headers = extra + refusal.headers
            if refusal.status == 401:
                metadata = self._base(scope) + WELL_KNOWN + self._resource(scope["path"])
                challenge = f'Bearer realm="steward", resource_metadata="{metadata}"'
                headers = [*extra, (b"www-authenticate", challenge.encode())]
            await send_json(send, refusal.status, refusal.jsonrpc(), headers)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, extra: Headers) -> None:
        path: str = scope["path"]
        if path in ("/mcp", "/mcp/"):
            await self._discovery(scope, send, extra)
            return
        found = self.routes.mcp_route(path[len("/mcp/") :])
        if found is None:
            name = path[len("/mcp/") :].partition("/")[0]
            raise Refusal(404, f"no MCP server named '{name}'", "not_found")
        route, rest = found
        name = route.name
        who = await self.admission.caller(scope, "mcp.invoke")
        project, principal = who.project, who.principal
        if not route.visible_to(project):  # another project's endpoint: as if absent
            raise Refusal(404, f"no MCP server named '{name}'", "not_found")
        if self.traced:
            span = trace.get_current_span()
            if span.is_recording():
                span.set_attributes({"steward.project": project, "steward.mcp.server": name})
        approved = self.admission.version(
            project, "mcp_server", route.asset_name, route.version, f"the MCP server '{name}'"
        )
        session = _header(scope, b"mcp-session-id")
        if session is not None and self._sessions.get(session, project) != project:
            raise Refusal(404, "unknown session", "not_found")  # as the server would say

        method = scope["method"]
        body = b""
        # Metered: each tool call (a JSON-RPC batch may hold several); protocol chatter such as
        # initialize or tools/list is not. Audited: the calls that may change something.
        calls: list[Call] = []
        audits: list[AuditRecorded] = []
        listing: set[Hashable] = set()
        grant = self.admission.auth.limits(project, "mcp_server", route.asset_name)
        # Fail closed: a version that lists no tools offers none; a grant may offer fewer.
        catalogued = {t.name: t for t in approved.tools}
        allowed_tools = {t.name for t in approved.tools if grant is None or grant.allows(t)}
        if method == "POST":
            try:
                body = await read_body(scope, receive, self.body)
            except BodyError as exc:
                raise Refusal(exc.status, str(exc), "bad_body", headers=CLOSE) from None
            except ClientGone:
                return
            messages = _messages(body)
            listing = list_ids(messages)
            for message in messages:
                reading = message.get("method") in READING
                if reading and grant is not None and not grant.allows_reading():
                    refusal = (
                        f"project '{project}' may use named tools of the MCP server "
                        f"'{name}' only, not its resources or prompts"
                    )
                    await send_json(send, 200, rpc_error(refusal, id_=message.get("id")), extra)
                    return
                if message.get("method") != "tools/call":
                    continue
                params = message.get("params")
                tool = params.get("name") if isinstance(params, dict) else None
                if tool is not None and not isinstance(tool, str):
                    raise Refusal(400, "a tools/call names its tool with a string", "invalid")
                call = Call(
                    project=project,
                    credential_id=principal.credential_id,
                    subject=principal.subject,
                    model=name,
                    endpoint=f"{name}/{tool}",
                    kind="mcp",
                    asset=route.asset_name,
                    asset_version=approved.version,
                    started=time.perf_counter(),
                    gateway_id=self.admission.quota.gateway_id,
                    request_bytes=len(body) if len(messages) == 1 else _size(message),
                    request_id=extra[0][1].decode(),
                )
                if tool not in allowed_tools:
                    if tool in catalogued:
                        assert grant is not None
                        call.fail(200, "tool_not_granted")
                        refusal = (
                            f"the tool '{tool}' is outside project '{project}''s access to the "
                            f"MCP server '{name}' ({_describe(grant)})"
                        )
                    else:
                        call.fail(200, "tool_not_approved")
                        refusal = f"the tool '{tool}' is not approved for the MCP server '{name}'"
                    # The batch goes nowhere: its other calls were not made.
                    finish(call, self.usage, traced=self.traced)
                    await send_json(send, 200, rpc_error(refusal, id_=message.get("id")), extra)
                    return
                calls.append(call)
                if catalogued[tool].access != "read_only":  # it may change something
                    audits.append(
                        AuditRecorded(
                            service="gateway",
                            actor=principal.subject,
                            action="mcp.tool.call",
                            target=f"mcp_server/{name}/{tool}",
                            project=project,
                            after={
                                "access": catalogued[tool].access,
                                "credential_id": principal.credential_id,
                                **audited_arguments(
                                    params.get("arguments") if isinstance(params, dict) else None,
                                    self.redact,
                                ),
                            },
                            request_id=extra[0][1].decode(),
                            at=utcnow(),
                        )
                    )
        reservation = self._reserve(calls, project, principal.credential_id, name)
        if reservation is not None:
            extra = extra + client_headers(reservation)
        url = route.upstream + ("/" + rest if rest else "")
        query = scope.get("query_string", b"")
        if query:
            url += "?" + query.decode("latin-1")
        headers = upstream_headers(scope, {"x-request-id": extra[0][1].decode()})
        if route.api_key is not None:
            headers["authorization"] = "Bearer " + route.api_key.get_secret_value()
        http = self.guarded_http if route.guarded else self.http
        request = http.build_request(method, url, content=body, headers=headers)
        sent = time.perf_counter()
        for call in calls:
            call.sent_upstream = sent

        def rewrite(response: httpx.Response) -> ToolsFilter | None:
            if not listing:
                return None
            sse = response.headers.get("content-type", "").startswith("text/event-stream")
            return ToolsFilter(listing, allowed_tools, sse=sse)

        try:
            outcome = await forward(
                http,
                receive,
                send,
                request,
                extra_headers=lambda _: extra,
                error_body=_error_body,
                egress=MCP,
                rewrite=rewrite,
            )
        finally:
            if reservation is not None:
                self.admission.quota.settle(
                    reservation, input_tokens=0, output_tokens=0, requests=len(calls)
                )
        self._track_session(method, session, outcome, project)
        shares = _shares(outcome.bytes_out, len(calls))
        for call, share in zip(calls, shares, strict=True):
            call.response_bytes = share
            call.http_status = outcome.status
            if outcome.error_type is not None:
                call.fail(outcome.status, outcome.error_type)
            elif outcome.disconnected and not outcome.started:
                # An MCP client closes an SSE response once it has its JSON-RPC answer, so only
                # leaving before the answer began counts as cancelled.
                call.status, call.error_type = "cancelled", "client_disconnected"
            elif outcome.status >= 400:
                call.fail(outcome.status, f"upstream_{outcome.status}")
            finish(call, self.usage, traced=self.traced)
        for audit in audits:
            assert audit.after is not None
            audit.after.update(status=calls[0].status, http_status=calls[0].http_status)
            self.usage.record(audit)

    def _reserve(
        self, calls: list[Call], project: str, credential_id: str, server: str
    ) -> Reservation | None:
        """Hold the tool calls of one POST against the project's call quotas on the server
        (a refusal is a 429 with a JSON-RPC error; its calls are recorded, not made)."""
        if not calls:
            return None
        try:
            reservation = self.admission.reserve(
                project=project,
                credential_id=credential_id,
                model=server,
                input_tokens=0,
                output_tokens=0,
                requests=len(calls),
            )
        except Refusal as refusal:
            for call in calls:
                call.fail(refusal.status, refusal.reason)
                finish(call, self.usage, traced=self.traced)
            raise
        for call in calls:
            call.admitted = True
        return reservation

    async def _discovery(self, scope: Scope, send: Send, extra: Headers) -> None:
        """The MCP servers this caller may use: entitled, approved, routed; with the URL to
        give a client and the tools it may call."""
        if scope["method"] != "GET":
            raise Refusal(405, "/mcp/ accepts GET only", "method_not_allowed")
        who = await self.admission.identify(scope)
        servers: list[dict[str, Any]] = []
        base = self._base(scope)
        if decide(who.principal, "mcp.invoke", who.project).allowed:
            for name, route in sorted(self.routes.mcp.items()):
                if not route.visible_to(who.project):
                    continue
                version = self.admission.catalog.approved(
                    "mcp_server", route.asset_name, route.version
                )
                if version is None or not self.admission.auth.entitled(
                    who.project, "mcp_server", route.asset_name
                ):
                    continue
                grant = self.admission.auth.limits(who.project, "mcp_server", route.asset_name)
                tools = [t for t in version.tools if grant is None or grant.allows(t)]
                servers.append(
                    {
                        "name": name,
                        "version": version.version,
                        "url": f"{base}/mcp/{name}/",
                        "transport": "streamable-http",
                        "tools": [t.model_dump() for t in tools],
                    }
                )
        await send_json(send, 200, {"object": "list", "data": servers}, extra)

    async def resource_metadata(self, scope: Scope, send: Send, rid: bytes) -> None:
        """RFC 9728 metadata for the gateway's MCP servers (``/.well-known/
        oauth-protected-resource`` for all of ``/mcp/``, or followed by one server's path)."""
        extra: Headers = [(b"x-request-id", rid), (b"cache-control", b"max-age=300")]
        path = scope["path"][len(WELL_KNOWN) :] or "/mcp/"
        if scope["method"] != "GET" or not (path == "/mcp/" or path.startswith("/mcp/")):
            await send_json(send, 404, {"error": "not_found"}, extra[:1])
            return
        metadata: dict[str, Any] = {
            "resource": self._base(scope) + path,
            "bearer_methods_supported": ["header"],
            "scopes_supported": ["mcp:invoke"],
            "resource_name": "Steward MCP gateway",
        }
        if self.issuer:
            metadata["authorization_servers"] = [self.issuer]
        await send_json(send, 200, metadata, extra)

    def _resource(self, path: str) -> str:
        """The resource a ``/mcp/…`` path belongs to: its server's root (``/mcp/{server}/``)."""
        found = self.routes.mcp_route(path[len("/mcp/") :]) if path.startswith("/mcp/") else None
        return f"/mcp/{found[0].name}/" if found is not None else "/mcp/"

    def _base(self, scope: Scope) -> str:
        """The gateway's public URL: configured (STEWARD_GATEWAY_PUBLIC_URL), else as the
        client reached it."""
        if self.public_url:
            return self.public_url
        host = _header(scope, b"host") or "localhost"
        return f"{scope.get('scheme', 'http')}://{host}"

    def _track_session(self, method: str, sent: str | None, outcome: Outcome, project: str) -> None:
        if method == "DELETE" and sent is not None:
            self._sessions.pop(sent, None)
            return
        opened = outcome.response_headers.get(SESSION_HEADER)
        if opened and opened not in self._sessions:
            self._sessions[opened] = project
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)


def _describe(grant: EntitlementState) -> str:
    limits = []
    if grant.tool_access is not None:
        limits.append(" or ".join(grant.tool_access) + " tools")
    if grant.tools is not None:
        limits.append("the tools " + ", ".join(grant.tools))
    return "limited to " + " among ".join(limits)


def _size(message: dict[str, Any]) -> int:
    """A message's own bytes within a batch (compact JSON)."""
    return len(json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode())


def _shares(total: int, n: int) -> list[int]:
    """``total`` divided among ``n`` calls, the remainder to the first ones: sums stay exact."""
    if n == 0:
        return []
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _messages(body: bytes) -> list[dict[str, Any]]:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        raise Refusal(400, "the body is not valid JSON-RPC", "invalid") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items or not all(isinstance(m, dict) for m in items):
        raise Refusal(400, "the body is not valid JSON-RPC", "invalid")
    return items
