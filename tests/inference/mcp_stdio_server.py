"""A TEST MCP SERVER that speaks stdio, built with the official ``mcp`` SDK: what an npm or PyPI
package from the MCP registry is to the bridge (services/inference/mcp_bridge.py).

``python tests/inference/mcp_stdio_server.py``. Tools: ``lookup`` (read-only), ``close_ticket``
(which changes something) and ``token_seen`` (says whether ``TICKETS_TOKEN`` reached it from the
endpoint's sealed environment, by its length, never the value). Each process counts its own
calls, so sessions sharing a process would show.
"""

from __future__ import annotations

import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("steward-test-tickets")
CALLS = {"n": 0}


@server.tool()
def lookup(ticket: str) -> str:
    """Read a ticket."""
    CALLS["n"] += 1
    return f"ticket {ticket}: open (call {CALLS['n']} of this process)"


@server.tool()
def close_ticket(ticket: str) -> str:
    """Close a ticket."""
    return f"ticket {ticket}: closed"


@server.tool()
def token_seen() -> str:
    """The length of TICKETS_TOKEN in this process's environment."""
    return str(len(os.environ.get("TICKETS_TOKEN", "")))


if __name__ == "__main__":
    server.run("stdio")
