"""MCP over streamable HTTP at ``/mcp/{server}/``: approved servers, approved tools only.

Each POST carries JSON-RPC; the gateway reads it once to refuse a ``tools/call`` for a tool the
catalog does not list for the server's approved version (the only check that needs the body), then
relays the request and streams the answer (JSON or SSE) back untouched. ``Mcp-Session-Id`` passes
through both ways and is bound to the project that opened the session, so another tenant cannot
ride on a session id it learned.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from starlette.types import Receive, Scope, Send

from gateway.authn import AuthFailure, project_of
from gateway.calls import Call
from gateway.egress import MCP
from gateway.http import (
    CLOSE,
    BodyError,
    ClientGone,
    Headers,
    read_body,
    send_json,
    upstream_headers,
)
from gateway.relay import Outcome, forward
from libs.common.auth import decide
from libs.common.outbox import current_traceparent

if TYPE_CHECKING:
    from gateway.app import Gateway

SESSION_HEADER = "mcp-session-id"
MAX_SESSIONS = 100_000
# JSON-RPC error codes: the reserved "server error" range for gateway refusals.
REFUSED = -32001
INVALID_REQUEST = -32600


def rpc_error(message: str, code: int = REFUSED, id_: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


def _error_body(status: int, message: str) -> tuple[bytes, bytes]:
    return json.dumps(rpc_error(message)).encode(), b"application/json"


class McpRefusal(Exception):
    def __init__(
        self, status: int, message: str, kind: str, id_: Any = None, headers: Headers | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.headers = headers or []
        self.body = rpc_error(message, REFUSED if status != 400 else INVALID_REQUEST, id_)


class McpProxy:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        # session id → project that opened it (bounded, oldest forgotten first)
        self._sessions: OrderedDict[str, str] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        extra: Headers = [(b"x-request-id", rid)]
        try:
            await self._handle(scope, receive, send, extra)
        except McpRefusal as refusal:
            headers = extra + refusal.headers
            if refusal.status == 401:
                headers = [*extra, (b"www-authenticate", b'Bearer realm="steward"')]
            await send_json(send, refusal.status, refusal.body, headers)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, extra: Headers) -> None:
        name, _, rest = scope["path"][len("/mcp/") :].partition("/")
        route = self.gw.routes.mcp.get(name)
        if route is None:
            raise McpRefusal(404, f"no MCP server named '{name}'", "not_found")
        try:
            principal = await self.gw.authn.principal(scope)
            project = project_of(principal, scope)
        except AuthFailure as failure:
            raise McpRefusal(failure.status, failure.message, failure.code) from None
        if self.gw.tracer is not None:
            span = trace.get_current_span()
            if span.is_recording():
                span.set_attributes({"steward.project": project, "steward.mcp.server": name})
        decision = decide(principal, "mcp.invoke", project)
        if not decision.allowed:
            raise McpRefusal(403, decision.reason, "forbidden")
        if not self.gw.auth.entitled(project, "mcp_server", route.asset_name):
            raise McpRefusal(
                403, f"project '{project}' is not entitled to the MCP server '{name}'", "forbidden"
            )
        if not self.gw.catalog.loaded:
            raise McpRefusal(503, "the catalog replica is not loaded yet", "unavailable")
        approved = self.gw.catalog.approved("mcp_server", route.asset_name, route.version)
        if approved is None:
            raise McpRefusal(403, f"the MCP server '{name}' has no approved version", "forbidden")
        session = _header(scope, b"mcp-session-id")
        if session is not None and self._sessions.get(session, project) != project:
            raise McpRefusal(404, "unknown session", "not_found")  # as the server would say

        method = scope["method"]
        body = b""
        call: Call | None = None
        if method == "POST":
            try:
                body = await read_body(
                    scope,
                    receive,
                    self.gw.settings.gateway_max_request_bytes,
                    self.gw.settings.gateway_body_timeout_seconds,
                )
            except BodyError as exc:
                raise McpRefusal(exc.status, str(exc), "bad_body", headers=CLOSE) from None
            except ClientGone:
                return
            messages = _messages(body)
            allowed_tools = {t.name for t in approved.tools}
            for message in messages:
                if message.get("method") != "tools/call":
                    continue
                params = message.get("params")
                tool = params.get("name") if isinstance(params, dict) else None
                # Metered: tool calls (protocol chatter such as initialize or tools/list is not).
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
                    gateway_id=self.gw.quota.gateway_id,
                )
                if tool not in allowed_tools:
                    call.fail(200, "tool_not_approved")
                    self._record(call)
                    refusal = f"the tool '{tool}' is not approved for the MCP server '{name}'"
                    await send_json(send, 200, rpc_error(refusal, id_=message.get("id")), extra)
                    return
        url = route.upstream + ("/" + rest if rest else "")
        query = scope.get("query_string", b"")
        if query:
            url += "?" + query.decode("latin-1")
        headers = upstream_headers(scope, {"x-request-id": extra[0][1].decode()})
        if route.api_key is not None:
            headers["authorization"] = "Bearer " + route.api_key.get_secret_value()
        request = self.gw.http.build_request(method, url, content=body, headers=headers)
        if call is not None:
            call.sent_upstream = time.perf_counter()
        outcome = await forward(
            self.gw.http,
            receive,
            send,
            request,
            extra_headers=lambda _: extra,
            error_body=_error_body,
            egress=MCP,
        )
        self._track_session(method, session, outcome, project)
        if call is not None:
            call.http_status = outcome.status
            if outcome.error_type is not None:
                call.fail(outcome.status, outcome.error_type)
            elif outcome.disconnected and not outcome.started:
                # An MCP client closes an SSE response once it has its JSON-RPC answer, so only
                # leaving before the answer began counts as cancelled.
                call.status, call.error_type = "cancelled", "client_disconnected"
            elif outcome.status >= 400:
                call.fail(outcome.status, f"upstream_{outcome.status}")
            self._record(call)

    def _record(self, call: Call) -> None:
        call.observe()
        traceparent = current_traceparent() if self.gw.tracer is not None else None
        self.gw.usage.record(call.to_event(), traceparent=traceparent)

    def _track_session(self, method: str, sent: str | None, outcome: Outcome, project: str) -> None:
        if method == "DELETE" and sent is not None:
            self._sessions.pop(sent, None)
            return
        opened = outcome.response_headers.get(SESSION_HEADER)
        if opened and opened not in self._sessions:
            self._sessions[opened] = project
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _messages(body: bytes) -> list[dict[str, Any]]:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        raise McpRefusal(400, "the body is not valid JSON-RPC", "invalid") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items or not all(isinstance(m, dict) for m in items):
        raise McpRefusal(400, "the body is not valid JSON-RPC", "invalid")
    return items
