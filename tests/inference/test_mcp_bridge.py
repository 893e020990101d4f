"""The stdio ↔ streamable-HTTP bridge, as a real process, with the official MCP SDK as client and
a real stdio MCP server behind it: one server process per session, the SDK's whole handshake,
tool calls, sessions that end, and a command that is no MCP server failing the start."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.inference.support import bridge

SERVER = Path(__file__).with_name("mcp_stdio_server.py")
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}


async def test_the_sdk_client_talks_to_a_stdio_server_through_the_bridge() -> None:
    async with bridge(sys.executable, str(SERVER)) as base:
        async with (
            create_mcp_http_client() as http,
            Client(streamable_http_client(f"{base}/mcp", http_client=http), mode="legacy") as one,
            create_mcp_http_client() as http2,
            Client(streamable_http_client(f"{base}/mcp", http_client=http2), mode="legacy") as two,
        ):
            tools = await one.list_tools()
            assert {t.name for t in tools.tools} == {"lookup", "close_ticket", "token_seen"}
            first = await one.call_tool("lookup", {"ticket": "T-1"})
            again = await one.call_tool("lookup", {"ticket": "T-2"})
            other = await two.call_tool("lookup", {"ticket": "T-3"})
        # Each session has its own server process: the second client's call is its first.
        assert first.content[0].text == "ticket T-1: open (call 1 of this process)"  # type: ignore[union-attr]
        assert again.content[0].text == "ticket T-2: open (call 2 of this process)"  # type: ignore[union-attr]
        assert other.content[0].text == "ticket T-3: open (call 1 of this process)"  # type: ignore[union-attr]


async def test_sessions_are_required_known_and_ended_by_delete() -> None:
    async with (
        bridge(sys.executable, str(SERVER)) as base,
        httpx.AsyncClient(base_url=base) as http,
    ):
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        assert (await http.post("/mcp", json=listing)).status_code == 400  # no session
        opened = await http.post("/mcp", json=INIT)
        assert opened.status_code == 200
        assert opened.json()["result"]["serverInfo"]["name"] == "steward-test-tickets"
        session = {"mcp-session-id": opened.headers["mcp-session-id"]}
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await http.post("/mcp", json=note, headers=session)).status_code == 202
        batch = await http.post("/mcp", json=[listing, {**listing, "id": 3}], headers=session)
        assert [a["id"] for a in batch.json()] == [2, 3]
        assert (await http.get("/mcp", headers=session)).status_code == 405
        assert (await http.delete("/mcp", headers=session)).status_code == 204
        gone = await http.post("/mcp", json=listing, headers=session)
        assert gone.status_code == 404  # the client starts a new session
        assert (await http.post("/mcp", content=b"{", headers=session)).status_code == 400


async def test_a_command_that_is_no_mcp_server_never_becomes_healthy() -> None:
    with pytest.raises(AssertionError, match="exited with 1"):
        async with bridge(sys.executable, "-c", "print('hello')"):
            pass
