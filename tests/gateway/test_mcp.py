"""MCP through the gateway with the official SDK client: approved servers, approved tools only,
sessions bound to the project that opened them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from libs.common.settings import Settings
from tests.gateway.conftest import RunningGateway, tenant
from tests.gateway.support import upstream_json, usage_events
from tests.helpers import bearer

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}
ACCEPT = {"Accept": "application/json, text/event-stream"}


@asynccontextmanager
async def mcp_client(url: str, key: str, mode: Any = "legacy") -> AsyncIterator[Client]:
    async with create_mcp_http_client(headers=bearer(key)) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode) as client:
            yield client


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_the_sdk_client_lists_and_calls_an_approved_tool_through_the_gateway(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, mode: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["tools"], kind="mcp_server")
    async with mcp_client(f"{gw.url}/mcp/tools/", t.key, mode) as client:
        tools = await client.list_tools()
        assert {tool.name for tool in tools.tools} >= {"echo"}
        result = await client.call_tool("echo", {"text": "through steward"})
        assert result.content[0].text == "echo: through steward"  # type: ignore[union-attr]


async def test_a_tool_the_catalog_does_not_list_is_refused_before_the_server_sees_it(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
    mcp_upstream: str,
) -> None:
    t = await tenant(authz, admin_key, gw, ["tools"], kind="mcp_server")
    async with mcp_client(f"{gw.url}/mcp/tools/", t.key) as client:
        with pytest.raises(Exception, match="not approved") as refused:
            await client.call_tool("delete_everything", {})
        assert "delete_everything" in str(refused.value)
        result = await client.call_tool("echo", {"text": "still fine"})
        assert result.content[0].text == "echo: still fine"  # type: ignore[union-attr]
    stats = await upstream_json(mcp_upstream.removesuffix("/mcp"), "/_stats")
    assert stats == {"delete_everything": 0}
    # One usage event per tool call, refused or not; protocol chatter is not metered.
    events = await usage_events(settings.nats_url, settings.event_namespace, t.project, 2)
    refused_call, echo_call = (e["data"] for e in events)
    assert refused_call["endpoint"] == "tools/delete_everything"
    assert refused_call["status"] == "error" and refused_call["error_type"] == "tool_not_approved"
    assert echo_call["endpoint"] == "tools/echo" and echo_call["status"] == "ok"
    assert {e["data"]["kind"] for e in events} == {"mcp"}


async def test_raw_streamable_http_carries_the_session_header_and_sse(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["tools"], kind="mcp_server")
    other = await tenant(authz, admin_key, gw, ["tools"], kind="mcp_server")
    async with httpx.AsyncClient(base_url=gw.url) as http:
        init = await http.post("/mcp/tools/", json=INIT, headers={**bearer(t.key), **ACCEPT})
        assert init.status_code == 200
        session = init.headers["mcp-session-id"]
        assert init.headers["content-type"].startswith(("text/event-stream", "application/json"))
        assert "protocolVersion" in init.text
        # Another project's key may not ride on this session.
        hijack = await http.post(
            "/mcp/tools/",
            json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
            headers={**bearer(other.key), **ACCEPT, "mcp-session-id": session},
        )
        assert hijack.status_code == 404
        bye = await http.delete("/mcp/tools/", headers={**bearer(t.key), "mcp-session-id": session})
        assert bye.status_code in (200, 204)


@pytest.mark.parametrize(
    ("server", "kind", "models", "status"),
    [
        ("tools", "model", ["tools"], 403),  # entitled to a model of that name, not the server
        ("unapproved-tools", "mcp_server", ["unapproved-tools"], 403),
        ("nowhere", "mcp_server", ["tools"], 404),
    ],
)
async def test_mcp_servers_need_an_entitlement_and_an_approved_version(
    gw: RunningGateway,
    authz: httpx.AsyncClient,
    admin_key: str,
    server: str,
    kind: str,
    models: list[str],
    status: int,
) -> None:
    t = await tenant(authz, admin_key, gw, models, kind=kind)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        response = await http.post(
            f"/mcp/{server}/", json=INIT, headers={**bearer(t.key), **ACCEPT}
        )
    assert response.status_code == status
    assert response.json()["error"]["message"]


async def test_mcp_needs_the_mcp_invoke_scope_and_a_credential(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(
        authz, admin_key, gw, ["tools"], kind="mcp_server", scopes=["inference:invoke"]
    )
    async with httpx.AsyncClient(base_url=gw.url) as http:
        scoped = await http.post("/mcp/tools/", json=INIT, headers={**bearer(t.key), **ACCEPT})
        assert scoped.status_code == 403
        anonymous = await http.post("/mcp/tools/", json=INIT, headers=ACCEPT)
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Bearer")


async def test_a_tool_call_naming_no_string_is_a_clear_4xx(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str
) -> None:
    t = await tenant(authz, admin_key, gw, ["tools"], kind="mcp_server")
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": ["echo"]}}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        answer = await http.post("/mcp/tools/", json=body, headers={**bearer(t.key), **ACCEPT})
    assert answer.status_code == 400
    assert "string" in answer.json()["error"]["message"]
