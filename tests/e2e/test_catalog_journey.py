"""The journey from the issue, across authz, catalog and approval, through real NATS events:
import → nothing in the dropdown → asset request approved → in the dropdown → access request
approved → entitlement → revoke → gone."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import nats

from libs.common.settings import Settings
from tests.approval.support import (
    DEV_SCOPES,
    approve,
    asset,
    catalog_yaml,
    eventually,
    file_request,
    import_yaml,
    mcp_server,
    model,
    uname,
    wait_status,
)
from tests.helpers import NATS_URL, bearer, member_key, new_project, ok


async def _dropdown(catalog: httpx.AsyncClient, key: str, text: str) -> list[str]:
    page = await ok(
        await catalog.get(
            "/v1/catalog", params={"status": "approved", "q": text}, headers=bearer(key)
        )
    )
    return [item["name"] for item in page["items"]]


async def test_asset_and_access_journey_from_import_to_revocation(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    settings: Settings,
) -> None:
    prefix = uname("journey")
    first, second, server = f"{prefix}/llm-8b", f"{prefix}/embed", f"{prefix}-tools"
    text = catalog_yaml([model(first), model(second)], [mcp_server(server)])

    # A platform admin imports two models and one MCP server: all drafts.
    imported = await import_yaml(catalog, admin_key, text)
    assert (imported["created"], imported["unchanged"]) == (3, 0)
    assert await import_yaml(catalog, admin_key, text) == {
        **imported,
        "created": 0,
        "unchanged": 3,
        "versions": [{**v, "outcome": "unchanged"} for v in imported["versions"]],
    }

    # A developer of project A sees none of them in the dropdown.
    project = await new_project(authz, admin_key, "team-a")
    dev = await member_key(authz, admin_key, project, "developer", DEV_SCOPES)
    assert await _dropdown(catalog, dev, prefix) == []

    # The developer asks for the first model to be admitted; the version is submitted.
    request = await file_request(
        approval,
        dev,
        project,
        "asset",
        {"asset_kind": "model", "asset_name": first, "version": "1.0.0"},
    )
    assert request["status"] == "pending"
    assert {c["check"]: c["ok"] for c in request["payload"]["checklist"]} == {
        "provenance": True,
        "digest": True,
        "license": True,
        "license_link": True,
    }
    await wait_status(catalog, admin_key, "model", first, "1.0.0", "submitted")
    assert await _dropdown(catalog, dev, prefix) == []

    # Pat approves; the catalog follows the event; the model is in the dropdown, alone.
    decided = await approve(approval, admin_key, request["id"], "checked provenance")
    assert decided["status"] == "approved"
    assert decided["decided_by"] == "admin"
    assert decided["lead_time_seconds"] >= 0
    await wait_status(catalog, admin_key, "model", first, "1.0.0", "approved")
    assert await _dropdown(catalog, dev, prefix) == [first]

    # An approved version is immutable: a changed entry under the same version is refused.
    changed = catalog_yaml([model(first, description="changed")])
    refused = await catalog.post(
        "/v1/imports/catalog",
        content=changed.encode(),
        headers={**bearer(admin_key), "content-type": "application/yaml"},
    )
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "models[0].version"

    # The developer requests access; after approval authz holds the entitlement.
    access = await file_request(
        approval, dev, project, "access", {"asset_kind": "model", "asset_name": first}
    )
    await approve(approval, admin_key, access["id"])

    async def entitled() -> bool:
        listed = await ok(
            await authz.get(f"/v1/projects/{project}/entitlements", headers=bearer(admin_key))
        )
        return any(e["asset_name"] == first for e in listed)

    await eventually(entitled, what="the entitlement in authz")

    # The gateway's snapshot lists the approved version.
    snap = await ok(await catalog.get("/v1/snapshot", headers=bearer(admin_key)))
    assert [v["version"] for v in snap["versions"] if v["asset_name"] == first] == ["1.0.0"]

    # Revoking it publishes catalog.version.revoked and takes it out of dropdown and snapshot.
    version_id = next(v["version_id"] for v in imported["versions"] if v["name"] == first)
    nc = await nats.connect(NATS_URL)
    try:
        heard: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def on_message(msg: Any) -> None:
            await heard.put(json.loads(msg.data))

        await nc.subscribe(f"{settings.event_namespace}.catalog.version.revoked", cb=on_message)
        revoked = await ok(
            await catalog.post(
                f"/v1/versions/{version_id}/revoke",
                json={"reason": "licence withdrawn"},
                headers=bearer(admin_key),
            )
        )
        assert revoked["status"] == "revoked"
        while True:
            event = await asyncio.wait_for(heard.get(), 10)
            if event["data"]["version_id"] == version_id:
                break
        assert event["data"]["status"] == "revoked"
        assert event["data"]["asset_name"] == first
    finally:
        await nc.close()
    assert await _dropdown(catalog, dev, prefix) == []
    snap = await ok(await catalog.get("/v1/snapshot", headers=bearer(admin_key)))
    assert all(v["version_id"] != version_id for v in snap["versions"])

    # Every step is in the audit log, from all three services, and the chain verifies.
    async def audited() -> set[tuple[str, str]] | None:
        page = await ok(
            await approval.get("/v1/audit", params={"limit": 500}, headers=bearer(admin_key))
        )
        seen = {
            (r["service"], r["action"])
            for r in page["items"]
            if prefix in r["target"] or r["project"] == project
        }
        wanted = {
            ("catalog", "version.import.created"),
            ("catalog", "version.submit"),
            ("catalog", "version.approve"),
            ("catalog", "version.revoke"),
            ("approval", "request.create"),
            ("approval", "request.approve"),
            ("authz", "entitlement.grant"),
        }
        return seen if wanted <= seen else None

    await eventually(audited, what="audit records from catalog, approval and authz")
    verified = await ok(await approval.get("/v1/audit/verify", headers=bearer(admin_key)))
    assert verified["ok"] is True, verified["problems"]

    found = await asset(catalog, dev, "model", second)
    assert found is not None and found["versions"][0]["status"] == "draft"
