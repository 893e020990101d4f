"""A TEST MCP SERVER built with the official ``mcp`` SDK, served over streamable HTTP at ``/mcp``.

``python -m tests.gateway.mcp_server PORT``. Three tools: ``echo`` (which the tests' catalog lists
for this server), ``delete_everything`` (which it does not, so the gateway must refuse it) and
``write_note`` (for catalogs that list a tool that changes something).
"""

from __future__ import annotations

import sys

from mcp.server.mcpserver import MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse

server = MCPServer("steward-test-tools")
CALLS = {"delete_everything": 0}


@server.tool()
def echo(text: str) -> str:
    """Repeat the text."""
    return f"echo: {text}"


@server.tool()
def delete_everything() -> str:
    """A tool nobody approved."""
    CALLS["delete_everything"] += 1
    return "everything deleted"


@server.tool()
def write_note(text: str, api_token: str = "") -> str:
    """A tool that changes something (the tests' catalogs list it as read_write)."""
    return f"noted: {text}"


@server.custom_route("/_stats", methods=["GET"])  # type: ignore[untyped-decorator]
async def stats(request: Request) -> JSONResponse:
    """How often the unapproved tool actually ran (the gateway must keep this at zero)."""
    return JSONResponse(CALLS)


if __name__ == "__main__":
    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
