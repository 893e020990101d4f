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
from gateway.relay import Outcome, forward
from gateway.routes import RouteTable
from gateway.usage import UsageRecorder

SESSION_HEADER = "mcp-session-id"
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
        usage: UsageRecorder,
        body: BodyLimits,
        traced: bool,
    ) -> None:
        self.admission = admission
        self.routes = routes
        self.http = http
        self.usage = usage
        self.body = body
        self.traced = traced
        # session id → project that opened it (bounded, oldest forgotten first)
        self._sessions: OrderedDict[str, str] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, rid: bytes) -> None:
        extra: Headers = [(b"x-request-id", rid)]
        try:
            await self._handle(scope, receive, send, extra)
        except Refusal as refusal:
            headers = extra + refusal.headers
            if refusal.status == 401:
                headers = [*extra, (b"www-authenticate", b'Bearer realm="steward"')]
            await send_json(send, refusal.status, refusal.jsonrpc(), headers)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, extra: Headers) -> None:
        name, _, rest = scope["path"][len("/mcp/") :].partition("/")
        route = self.routes.mcp.get(name)
        if route is None:
            raise Refusal(404, f"no MCP server named '{name}'", "not_found")
        who = await self.admission.caller(scope, "mcp.invoke")
        project, principal = who.project, who.principal
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
        call: Call | None = None
        if method == "POST":
            try:
                body = await read_body(scope, receive, self.body)
            except BodyError as exc:
                raise Refusal(exc.status, str(exc), "bad_body", headers=CLOSE) from None
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
                    gateway_id=self.admission.quota.gateway_id,
                )
                if tool not in allowed_tools:
                    call.fail(200, "tool_not_approved")
                    finish(call, self.usage, traced=self.traced)
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
        request = self.http.build_request(method, url, content=body, headers=headers)
        if call is not None:
            call.sent_upstream = time.perf_counter()
        outcome = await forward(
            self.http,
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
            finish(call, self.usage, traced=self.traced)

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
        raise Refusal(400, "the body is not valid JSON-RPC", "invalid") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items or not all(isinstance(m, dict) for m in items):
        raise Refusal(400, "the body is not valid JSON-RPC", "invalid")
    return items
