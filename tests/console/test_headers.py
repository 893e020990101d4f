"""What the gateway sends with the console's files: no framing, no sniffing, no Referer."""

from __future__ import annotations

import httpx

from tests.console.conftest import Stack


async def test_console_files_forbid_framing_and_sniffing(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as client:
        page = await client.get("/console/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == "frame-ancestors 'none'"
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        escape = await client.get("/console/%2e%2e/pyproject.toml")  # decoded by the server
        # A '..' segment is refused before any area sees the path (gateway/http.py bad_path).
        assert escape.status_code == 400 and b"[project]" not in escape.content
