"""The console's MCP view in a real browser: a developer finds an approved MCP server they cannot
use yet, asks for its read-only tools, and once that is approved sees it with the URL to give a
client and only the read-only tool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import expect

from tests.approval.support import (
    admitted,
    approve,
    catalog_yaml,
    import_yaml,
    mcp_server,
    uname,
    wait_status,
)
from tests.console.conftest import Stack
from tests.console.support import console_page
from tests.helpers import bearer, member_key, new_project, ok


async def test_a_developer_asks_for_read_only_tools_and_gets_exactly_those(
    browser: Any,
    stack: Stack,
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    artifacts: Path,
) -> None:
    project = await new_project(authz, admin_key, "mcpv")
    dev_key = await member_key(
        authz,
        admin_key,
        project,
        "developer",
        ["catalog:read", "requests:write", "mcp:invoke", "projects:read"],
    )
    server = uname("tickets")
    await import_yaml(catalog, admin_key, catalog_yaml([], [mcp_server(server)]))
    await admitted(catalog, approval, admin_key, dev_key, project, "mcp_server", server)
    await wait_status(catalog, admin_key, "mcp_server", server, "1.0.0", "approved")

    dev = await console_page(browser, stack.url, artifacts)
    page = dev.page
    await dev.sign_in(dev_key)
    await dev.reload_until("mcp", "#mcp-requestable", server)
    await expect(page.locator("#mcp-usable")).to_contain_text("No MCP server yet")
    row = page.locator("#mcp-requestable tr", has_text=server)
    await row.get_by_role("link", name="read-only tools only").click()
    # The form opens on that server, read-only tools chosen.
    await expect(page.get_by_label("Asset")).to_have_value(f"mcp_server|{server}")
    await expect(page.get_by_label("Tools")).to_have_value("read_only")
    await page.get_by_role("button", name="Submit request").click()
    await expect(page.locator("#request-outcome")).to_contain_text("Request filed: access")

    listed = await ok(
        await approval.get(
            f"/v1/projects/{project}/requests",
            params={"kind": "access", "status": "pending"},
            headers=bearer(admin_key),
        )
    )
    [filed] = listed["items"]
    assert filed["payload"]["tool_access"] == ["read_only"]
    await approve(approval, admin_key, filed["id"])

    await dev.reload_until("mcp", "#mcp-usable", server)
    usable = page.locator("#mcp-usable")
    await expect(usable).to_contain_text(f"{stack.url}/mcp/{server}/")
    await expect(usable).to_contain_text("search")
    await expect(usable).to_contain_text("read only")
    await expect(usable).not_to_contain_text("write_note")  # outside the grant: not shown
    await expect(page.locator("#mcp-requestable")).not_to_contain_text(server)
    await dev.shot("10-developer-mcp-servers")
    assert await dev.unlabelled() == []
    dev.assert_clean()
