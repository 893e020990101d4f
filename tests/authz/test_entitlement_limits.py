"""An MCP server may be granted in part: only tools of some access types, or named tools. The
grant says so in the API, the replica snapshot and its events; changing what it covers is a new
decision (audited, mirrored once); a model cannot be limited to tools; bad limits change
nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.helpers import bearer, new_project, ok

SERVER = "io.github.acme/weather"


async def _put(
    authz: httpx.AsyncClient, key: str, project: str, kind: str, body: dict[str, Any]
) -> httpx.Response:
    path = f"/v1/projects/{project}/entitlements/{kind}/{SERVER}"
    return await authz.put(path, json=body, headers=bearer(key))


async def _snapshot_grant(authz: httpx.AsyncClient, key: str, project: str) -> dict[str, Any]:
    snapshot = await ok(await authz.get("/v1/snapshot", headers=bearer(key)))
    [grant] = [e for e in snapshot["entitlements"] if e["project"] == project]
    return dict(grant)


async def test_a_grant_can_cover_part_of_an_mcp_server_and_be_changed(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    project = await new_project(authz, admin_key, "limits")
    first = await _put(authz, admin_key, project, "mcp_server", {"tool_access": ["read_only"]})
    assert first.status_code == 201, first.text
    assert (first.json()["tool_access"], first.json()["tools"]) == (["read_only"], None)
    snapshot = await _snapshot_grant(authz, admin_key, project)
    revision = (await ok(await authz.get("/v1/snapshot", headers=bearer(admin_key))))["revision"]
    assert (snapshot["tool_access"], snapshot["tools"]) == (["read_only"], None)

    same = await _put(authz, admin_key, project, "mcp_server", {"tool_access": ["read_only"]})
    assert same.status_code == 200
    unchanged = (await ok(await authz.get("/v1/snapshot", headers=bearer(admin_key))))["revision"]
    assert unchanged == revision  # nothing changed, nothing mirrored

    narrower = await _put(authz, admin_key, project, "mcp_server", {"tools": ["forecast"]})
    assert narrower.status_code == 200
    assert (narrower.json()["tool_access"], narrower.json()["tools"]) == (None, ["forecast"])
    snapshot = await _snapshot_grant(authz, admin_key, project)
    assert (snapshot["tool_access"], snapshot["tools"]) == (None, ["forecast"])

    whole = await _put(authz, admin_key, project, "mcp_server", {})
    assert (whole.json()["tool_access"], whole.json()["tools"]) == (None, None)


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("model", {"tools": ["forecast"]}),  # a model has no tools
        ("mcp_server", {"tool_access": ["write"]}),
        ("mcp_server", {"tool_access": []}),
        ("mcp_server", {"tools": ["has space"]}),
    ],
)
async def test_bad_limits_are_refused_and_change_nothing(
    authz: httpx.AsyncClient, admin_key: str, kind: str, body: dict[str, Any]
) -> None:
    project = await new_project(authz, admin_key, "badlimits")
    refused = await _put(authz, admin_key, project, kind, body)
    assert refused.status_code == 422, refused.text
    listed = await ok(
        await authz.get(f"/v1/projects/{project}/entitlements", headers=bearer(admin_key))
    )
    assert listed == []


async def test_racing_changes_of_one_grant_leave_one_of_them_everywhere(
    authz: httpx.AsyncClient, admin_key: str
) -> None:
    for _ in range(5):
        project = await new_project(authz, admin_key, "racelimits")
        await ok(await _put(authz, admin_key, project, "mcp_server", {}), 201)
        bodies = [{"tool_access": ["read_only"]}, {"tools": ["forecast"]}]
        answers = await asyncio.gather(
            *(_put(authz, admin_key, project, "mcp_server", b) for b in bodies)
        )
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        [held] = await ok(
            await authz.get(f"/v1/projects/{project}/entitlements", headers=bearer(admin_key))
        )
        mirrored = await _snapshot_grant(authz, admin_key, project)
        limits = (held["tool_access"], held["tools"])
        assert limits in ((["read_only"], None), (None, ["forecast"]))
        assert (mirrored["tool_access"], mirrored["tools"]) == limits
