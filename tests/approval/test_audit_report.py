"""The audit report of a period, as an auditor gets it (JSON, CSV, HTML): the approvals with who
decided what and when and their lead time against the SLA, the requests still open, keys and
catalog changes from the other services' audit events, and the chain's verification."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from libs.common.db import utcnow
from libs.common.settings import Settings
from tests.approval.support import (
    DEV_SCOPES,
    Clock,
    catalog_yaml,
    clocked_approval,
    eventually,
    file_request,
    import_yaml,
    model,
    uname,
)
from tests.helpers import bearer, issue_key, member_key, new_project, ok


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
async def approval_app(
    settings: Settings, authz_app: FastAPI, catalog_app: FastAPI, clock: Clock
) -> AsyncIterator[FastAPI]:
    async for app in clocked_approval(settings, authz_app, catalog_app, clock):
        yield app


async def _asset_request(
    catalog: httpx.AsyncClient, approval: httpx.AsyncClient, admin_key: str, dev: str, project: str
) -> dict[str, Any]:
    name = uname("audited")
    await import_yaml(catalog, admin_key, catalog_yaml([model(name)]))
    payload = {"asset_kind": "model", "asset_name": name, "version": "1.0.0"}
    return await file_request(approval, dev, project, "asset", payload)


async def test_the_report_lists_decisions_against_the_sla_open_requests_keys_and_catalog(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    clock: Clock,
) -> None:
    start = min(clock.now, utcnow()) - timedelta(minutes=1)
    project = await new_project(authz, admin_key, "report")
    dev = await member_key(authz, admin_key, project, "developer", DEV_SCOPES)
    fast = await _asset_request(catalog, approval, admin_key, dev, project)
    slow = await _asset_request(catalog, approval, admin_key, dev, project)
    waiting = await _asset_request(catalog, approval, admin_key, dev, project)
    clock.advance(timedelta(hours=2))
    await ok(
        await approval.post(
            f"/v1/requests/{fast['id']}/approve",
            json={"comment": "fine"},
            headers=bearer(admin_key),
        )
    )
    clock.advance(timedelta(days=6))  # past the 5-day SLA
    comment = "<script>alert(1)</script> too late, sorry"
    await ok(
        await approval.post(
            f"/v1/requests/{slow['id']}/reject",
            json={"comment": comment},
            headers=bearer(admin_key),
        )
    )
    key = await issue_key(authz, admin_key, project, ["projects:read"])
    end = max(clock.now, utcnow()) + timedelta(minutes=1)
    params = {"start": start.isoformat(), "end": end.isoformat()}

    async def with_the_key() -> dict[str, Any] | None:
        """The report once the key's audit event (authz → NATS → approval) is in the chain."""
        found: dict[str, Any] = await ok(
            await approval.get("/v1/reports/audit", params=params, headers=bearer(admin_key))
        )
        return found if any(key["id"] in c["target"] for c in found["keys"]) else None

    report = await eventually(with_the_key, what="the key's audit record")
    decided = {a["request_id"]: a for a in report["approvals"]}
    assert decided[fast["id"]]["status"] == "approved"
    assert decided[fast["id"]]["decided_by"] == "admin"
    assert decided[fast["id"]]["lead_time_seconds"] == 2 * 3600
    assert decided[fast["id"]]["within_sla"] is True
    assert decided[slow["id"]]["within_sla"] is False
    assert decided[slow["id"]]["comment"] == comment
    still = {a["request_id"]: a for a in report["open_requests"]}
    assert waiting["id"] in still and still[waiting["id"]]["within_sla"] is False
    assert report["summary"]["by_kind"]["asset"]["rejected"] >= 1
    assert any(c["action"].startswith("version.import") for c in report["catalog"])
    assert report["verification"]["ok"] is True
    assert report["public_key"]

    as_csv = await approval.get(
        "/v1/reports/audit", params={**params, "format": "csv"}, headers=bearer(admin_key)
    )
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert "attachment" in as_csv.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    sections = {r["section"] for r in rows}
    assert {"approval", "key", "catalog", "verification"} <= sections
    [late] = [r for r in rows if r["target"] == slow["id"]]
    assert (late["status"], late["within_sla"], late["comment"]) == ("rejected", "no", comment)
    assert rows[-1]["status"] == "ok"

    as_html = await approval.get(
        "/v1/reports/audit", params={**params, "format": "html"}, headers=bearer(admin_key)
    )
    page = as_html.text
    assert as_html.headers["content-type"].startswith("text/html")
    assert "Verified: no record edited" in page
    assert slow["id"] in page and key["id"] in page
    assert "<script>" not in page and "&lt;script&gt;" in page  # values are escaped


async def test_a_bad_period_is_refused_and_the_report_needs_audit_read(
    authz: httpx.AsyncClient, approval: httpx.AsyncClient, admin_key: str
) -> None:
    now = utcnow()
    backwards = {"start": now.isoformat(), "end": (now - timedelta(days=1)).isoformat()}
    refused = await approval.get("/v1/reports/audit", params=backwards, headers=bearer(admin_key))
    assert refused.status_code == 422
    too_long = {"start": (now - timedelta(days=400)).isoformat(), "end": now.isoformat()}
    refused = await approval.get("/v1/reports/audit", params=too_long, headers=bearer(admin_key))
    assert refused.status_code == 422
    project = await new_project(authz, admin_key, "noaudit")
    dev = await member_key(authz, admin_key, project, "developer", DEV_SCOPES)
    period = {"start": "2026-01-01", "end": "2026-02-01"}
    forbidden = await approval.get("/v1/reports/audit", params=period, headers=bearer(dev))
    assert forbidden.status_code == 403
