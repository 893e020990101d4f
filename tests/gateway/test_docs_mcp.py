"""The developer guide's MCP example runs as written, with the current ``mcp`` SDK, against a
real gateway: it finds the server through ``GET /mcp/`` and sees only the catalogued tool."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import httpx

from tests.gateway.conftest import RunningGateway, tenant

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "developer-guide.md"


def _example() -> str:
    text = GUIDE.read_text()
    marker = text.index("<!-- runnable:", text.index("## MCP servers"))
    found = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    assert found is not None
    return found.group(1)


async def test_the_developer_guides_mcp_example_runs_as_written(
    gw: RunningGateway, authz: httpx.AsyncClient, admin_key: str, tmp_path: Path
) -> None:
    t = await tenant(authz, admin_key, gw, ["tools"], kind="mcp_server")
    script = tmp_path / "example.py"
    script.write_text(_example())
    env = {**os.environ, "STEWARD_GATEWAY_URL": gw.url, "STEWARD_API_KEY": t.key}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0] == f"tools {gw.url}/mcp/tools/ ['echo']"
    assert lines[-1] == "tools: ['echo']"  # the server's other tool is never shown
