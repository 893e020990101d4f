"""Requests: typed payloads, decisions and their rules, SLA clocks, queues and statistics.

The approval service here runs on a clock the tests move (``clock``): SLA, overdue, lead time and
expiry are decided on it, never on how much wall time a test happened to take."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from libs.common.settings import Settings
from services.approval import domain as approval_domain
from tests.approval.support import (
    DEV_SCOPES,
    Clock,
    admitted,
    approve,
    catalog_yaml,
    clocked_approval,
    eventually,
    file_request,
    import_yaml,
    mcp_server,
    model,
    uname,
    version_status,
    wait_status,
)
from tests.helpers import bearer, member_key, new_project, ok


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
async def approval_app(
    settings: Settings, authz_app: FastAPI, catalog_app: FastAPI, clock: Clock
) -> AsyncIterator[FastAPI]:
    """This module's approval service (``approval`` talks to it) runs on ``clock``."""
    async for app in clocked_approval(settings, authz_app, catalog_app, clock):
        yield app


@pytest.fixture
async def team(authz: httpx.AsyncClient, admin_key: str) -> dict[str, str]:
    project = await new_project(authz, admin_key, "team")
    return {
        "project": project,
        "dev": await member_key(authz, admin_key, project, "developer", DEV_SCOPES),
        "dev2": await member_key(authz, admin_key, project, "developer", DEV_SCOPES),
        "lead": await member_key(authz, admin_key, project, "project-admin", DEV_SCOPES),
    }


async def _draft(catalog: httpx.AsyncClient, admin_key: str, **extra: object) -> str:
    name = uname("req")
    await import_yaml(catalog, admin_key, catalog_yaml([model(name, **extra)]))
    return name


def _asset(name: str, version: str = "1.0.0") -> dict[str, str]:
    return {"asset_kind": "model", "asset_name": name, "version": version}


async def test_a_requester_can_never_approve_their_own_request(
    catalog: httpx.AsyncClient, approval: httpx.AsyncClient, admin_key: str, team: dict[str, str]
) -> None:
    name = await _draft(catalog, admin_key)
    mine = await file_request(approval, admin_key, team["project"], "asset", _asset(name))
    refused = await approval.post(f"/v1/requests/{mine['id']}/approve", headers=bearer(admin_key))
    assert refused.status_code == 403
    assert refused.json()["detail"] == "a requester can never approve their own request"
    still = await ok(await approval.get(f"/v1/requests/{mine['id']}", headers=bearer(admin_key)))
    assert still["status"] == "pending"


async def test_rejection_needs_a_reason_and_returns_the_version_to_draft(
    catalog: httpx.AsyncClient, approval: httpx.AsyncClient, admin_key: str, team: dict[str, str]
) -> None:
    name = await _draft(catalog, admin_key)
    request = await file_request(approval, team["dev"], team["project"], "asset", _asset(name))
    await wait_status(catalog, admin_key, "model", name, "1.0.0", "submitted")

    silent = await approval.post(
        f"/v1/requests/{request['id']}/reject", json={}, headers=bearer(admin_key)
    )
    assert silent.status_code == 422
    assert silent.json()["errors"][0]["field"] == "comment"

    rejected = await ok(
        await approval.post(
            f"/v1/requests/{request['id']}/reject",
            json={"comment": "no digest"},
            headers=bearer(admin_key),
        )
    )
    assert rejected["status"] == "rejected"
    assert rejected["decision_comment"] == "no digest"
    await wait_status(catalog, admin_key, "model", name, "1.0.0", "draft")

    again = await approval.post(f"/v1/requests/{request['id']}/approve", headers=bearer(admin_key))
    assert again.status_code == 409
    # Fixed and filed again, it can be admitted.
    await admitted(catalog, approval, admin_key, team["dev"], team["project"], "model", name)


async def test_only_the_requester_or_a_project_admin_withdraws(
    catalog: httpx.AsyncClient, approval: httpx.AsyncClient, admin_key: str, team: dict[str, str]
) -> None:
    first, second = await _draft(catalog, admin_key), await _draft(catalog, admin_key)
    a = await file_request(approval, team["dev"], team["project"], "asset", _asset(first))
    b = await file_request(approval, team["dev"], team["project"], "asset", _asset(second))

    other = await approval.post(f"/v1/requests/{a['id']}/withdraw", headers=bearer(team["dev2"]))
    assert other.status_code == 403
    mine = await ok(
        await approval.post(f"/v1/requests/{a['id']}/withdraw", headers=bearer(team["dev"]))
    )
    assert mine["status"] == "withdrawn"
    lead = await ok(
        await approval.post(f"/v1/requests/{b['id']}/withdraw", headers=bearer(team["lead"]))
    )
    assert lead["status"] == "withdrawn"
    await wait_status(catalog, admin_key, "model", first, "1.0.0", "draft")
    await wait_status(catalog, admin_key, "model", second, "1.0.0", "draft")


async def test_requests_must_name_what_the_catalog_has(
    catalog: httpx.AsyncClient, approval: httpx.AsyncClient, admin_key: str, team: dict[str, str]
) -> None:
    project, dev = team["project"], team["dev"]
    unknown = await approval.post(
        f"/v1/projects/{project}/requests",
        json={"kind": "asset", "payload": _asset("no-such-model")},
        headers=bearer(dev),
    )
    assert unknown.status_code == 422
    assert unknown.json()["errors"][0]["field"] == "payload.asset_name"

    name = await _draft(catalog, admin_key)
    wrong_version = await approval.post(
        f"/v1/projects/{project}/requests",
        json={"kind": "asset", "payload": _asset(name, "9.9.9")},
        headers=bearer(dev),
    )
    assert wrong_version.status_code == 422
    assert wrong_version.json()["errors"][0]["field"] == "payload.version"

    # Access to an asset not admitted yet is refused; so is a second pending asset request.
    too_early = await approval.post(
        f"/v1/projects/{project}/requests",
        json={"kind": "access", "payload": {"asset_kind": "model", "asset_name": name}},
        headers=bearer(dev),
    )
    assert too_early.status_code == 409
    assert "no approved version" in too_early.json()["detail"]
    await file_request(approval, dev, project, "asset", _asset(name))
    twice = await approval.post(
        f"/v1/projects/{project}/requests",
        json={"kind": "asset", "payload": _asset(name)},
        headers=bearer(team["dev2"]),
    )
    assert twice.status_code == 409

    unknown_field = await approval.post(
        f"/v1/projects/{project}/requests",
        json={"kind": "asset", "payload": {**_asset(name), "checklist": []}},
        headers=bearer(dev),
    )
    assert unknown_field.status_code == 422
    assert unknown_field.json()["errors"][0]["field"] == "payload.checklist"
    bad_kind = await approval.post(
        f"/v1/projects/{project}/requests",
        json={"kind": "gpu", "payload": {}},
        headers=bearer(dev),
    )
    assert bad_kind.status_code == 422


async def test_an_endpoint_request_carries_a_cost_and_security_plan_with_computed_cost(
    catalog: httpx.AsyncClient, approval: httpx.AsyncClient, admin_key: str, team: dict[str, str]
) -> None:
    project, dev = team["project"], team["dev"]
    name = await _draft(catalog, admin_key)
    plan = {
        "gpus": 2,
        "gpu_type": "nvidia-a100-80gb",
        "replicas": 2,
        "hours": 10,
        "gpu_hour_rate": 2.5,
        "data_classification": "internal",
        "network_exposure": "project",
    }
    payload = {"model_name": name, "version": "1.0.0", "plan": plan}
    not_yet = await approval.post(
        f"/v1/projects/{project}/requests",
        json={"kind": "endpoint", "payload": payload},
        headers=bearer(dev),
    )
    assert not_yet.status_code == 422
    assert not_yet.json()["errors"][0]["field"] == "payload.version"

    await admitted(catalog, approval, admin_key, dev, project, "model", name)
    request = await file_request(approval, dev, project, "endpoint", payload)
    assert request["cost"] == {"gpu_hours": 40.0, "estimated_cost": 100.0, "currency": "USD"}
    assert request["payload"]["plan"]["estimated_cost"] == 100.0
    shown = await ok(await approval.get(f"/v1/requests/{request['id']}", headers=bearer(admin_key)))
    assert shown["cost"]["estimated_cost"] == 100.0

    lying = {**payload, "plan": {**plan, "estimated_cost": 1}}
    refused = await approval.post(
        f"/v1/projects/{project}/requests",
        json={"kind": "endpoint", "payload": lying},
        headers=bearer(dev),
    )
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "payload.plan.estimated_cost"
    for broken, field in (
        ({k: v for k, v in payload.items() if k != "plan"}, "payload.plan"),
        ({**payload, "plan": {**plan, "replicas": 0}}, "payload.plan.replicas"),
        (
            {**payload, "plan": {**plan, "data_classification": "secret"}},
            "payload.plan.data_classification",
        ),
    ):
        response = await approval.post(
            f"/v1/projects/{project}/requests",
            json={"kind": "endpoint", "payload": broken},
            headers=bearer(dev),
        )
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == field


async def test_a_quota_request_is_validated_and_decided(
    approval: httpx.AsyncClient, admin_key: str, team: dict[str, str]
) -> None:
    project, dev = team["project"], team["dev"]
    bad = await approval.post(
        f"/v1/projects/{project}/requests",
        json={"kind": "quota", "payload": {"window": "day", "token_limit": -5}},
        headers=bearer(dev),
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "payload.token_limit"
    request = await file_request(
        approval,
        dev,
        project,
        "quota",
        {"window": "day", "token_limit": 2_000_000, "justification": "launch week"},
    )
    decided = await approve(approval, admin_key, request["id"])
    assert decided["status"] == "approved"
    assert decided["payload"]["token_limit"] == 2_000_000


async def test_the_sla_clock_runs_five_days_and_the_queue_shows_age_and_projects(
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    team: dict[str, str],
    clock: Clock,
) -> None:
    project = team["project"]
    name = await _draft(catalog, admin_key)
    request = await file_request(approval, team["dev"], project, "asset", _asset(name))
    created = datetime.fromisoformat(request["created_at"])
    due = datetime.fromisoformat(request["due_at"])
    assert created == clock.now
    assert due - created == timedelta(days=5)
    assert request["overdue"] is False
    assert request["age_seconds"] == 0

    async def queue(**params: str) -> list[dict[str, Any]]:
        page = await ok(
            await approval.get(
                "/v1/requests", params={"project": project, **params}, headers=bearer(admin_key)
            )
        )
        items: list[dict[str, Any]] = page["items"]
        return items

    async def stats() -> dict[str, Any]:
        # The developer sees their own project only: this test's requests, nobody else's.
        found: dict[str, Any] = await ok(
            await approval.get("/v1/requests/stats", headers=bearer(team["dev"]))
        )
        return found

    assert [r["id"] for r in await queue(status="pending")] == [request["id"]]
    assert await queue(overdue="true") == []
    assert (await stats())["by_project"] == {
        project: {"pending": 1, "overdue": 0, "oldest_pending_at": request["created_at"]}
    }

    # One second before the due date it is still on time; one second after, it is overdue.
    clock.advance(due - created - timedelta(seconds=1))
    shown = await ok(await approval.get(f"/v1/requests/{request['id']}", headers=bearer(admin_key)))
    assert shown["overdue"] is False
    assert await queue(overdue="true") == []
    clock.advance(timedelta(seconds=2))
    shown = await ok(await approval.get(f"/v1/requests/{request['id']}", headers=bearer(admin_key)))
    assert shown["overdue"] is True
    assert shown["status"] == "pending"
    assert shown["age_seconds"] == timedelta(days=5, seconds=1).total_seconds()
    assert [r["id"] for r in await queue(overdue="true")] == [request["id"]]
    assert await queue(overdue="false") == []
    after = await stats()
    assert after["by_project"] == {
        project: {"pending": 1, "overdue": 1, "oldest_pending_at": request["created_at"]}
    }
    assert after["by_kind"]["asset"] == {
        "decided": 0,
        "approved": 0,
        "rejected": 0,
        "pending": 1,
        "overdue": 1,
        "lead_time_median_seconds": None,
        "lead_time_p90_seconds": None,
    }


async def test_requests_past_their_sla_are_a_metric_for_the_alert(
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    approval_app: FastAPI,
    admin_key: str,
    team: dict[str, str],
    clock: Clock,
) -> None:
    """``steward_approval_overdue_requests`` (what the chart's SLA alert reads) counts what the
    queue shows as overdue, by kind."""
    name = await _draft(catalog, admin_key)
    request = await file_request(approval, team["dev"], team["project"], "asset", _asset(name))
    clock.advance(timedelta(days=5, seconds=1))
    sessionmaker = approval_app.state.ctx.sessionmaker

    async def agreed() -> dict[str, int] | None:
        """The gauge and the queue's stats, read together, agree (the expiry loop may decide
        old requests meanwhile: then read again)."""
        total = await approval_domain.measure_overdue(sessionmaker, clock.now)
        stats = await ok(await approval.get("/v1/requests/stats", headers=bearer(admin_key)))
        overdue = {kind: s["overdue"] for kind, s in stats["by_kind"].items()}
        gauge = {
            kind: REGISTRY.get_sample_value("steward_approval_overdue_requests", {"kind": kind})
            for kind in overdue
        }
        return overdue if gauge == overdue and total == sum(overdue.values()) else None

    overdue = await eventually(agreed, what="the gauge to agree with the queue")
    assert overdue["asset"] >= 1
    await ok(
        await approval.post(
            f"/v1/requests/{request['id']}/approve",
            json={"comment": "ok"},
            headers=bearer(admin_key),
        )
    )
    now = await eventually(agreed, what="the gauge to agree with the queue")
    assert now["asset"] <= overdue["asset"] - 1  # decided: no longer waiting


async def test_lead_time_statistics_give_median_and_p90_per_kind(
    approval: httpx.AsyncClient, admin_key: str, team: dict[str, str], clock: Clock
) -> None:
    """Filed together, decided one, two and four hours later: the lead times are exactly those."""
    requests = [
        await file_request(
            approval, team["dev"], team["project"], "quota", {"window": "hour", "token_limit": 10}
        )
        for _ in range(3)
    ]
    for request, hours in zip(requests, (1, 1, 2), strict=True):
        clock.advance(timedelta(hours=hours))
        decided = await approve(approval, admin_key, request["id"])
        assert datetime.fromisoformat(decided["decided_at"]) == clock.now
    # The developer sees their own project only: these three decisions, nobody else's.
    stats = await ok(await approval.get("/v1/requests/stats", headers=bearer(team["dev"])))
    quota = stats["by_kind"]["quota"]
    assert (quota["decided"], quota["approved"], quota["pending"]) == (3, 3, 0)
    assert quota["lead_time_median_seconds"] == 2 * 3600
    assert quota["lead_time_p90_seconds"] == 4 * 3600


async def test_comments_are_kept_in_order_on_the_request(
    approval: httpx.AsyncClient, admin_key: str, team: dict[str, str]
) -> None:
    request = await file_request(
        approval, team["dev"], team["project"], "quota", {"window": "day", "token_limit": 10}
    )
    for key, body in ((admin_key, "why so many?"), (team["dev"], "launch week")):
        await ok(
            await approval.post(
                f"/v1/requests/{request['id']}/comments", json={"body": body}, headers=bearer(key)
            ),
            201,
        )
    detail = await ok(
        await approval.get(f"/v1/requests/{request['id']}", headers=bearer(team["dev"]))
    )
    assert [(c["author"], c["body"]) for c in detail["comments"]][1] == (
        detail["requester"],
        "launch week",
    )
    assert detail["comments"][0]["body"] == "why so many?"


async def test_pending_requests_expire_after_their_deadline(
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    team: dict[str, str],
    clock: Clock,
) -> None:
    name = await _draft(catalog, admin_key)
    request = await file_request(approval, team["dev"], team["project"], "asset", _asset(name))
    await wait_status(catalog, admin_key, "model", name, "1.0.0", "submitted")
    due = datetime.fromisoformat(request["due_at"])
    expires = datetime.fromisoformat(request["expires_at"])
    assert expires - due == timedelta(days=30)

    # Past its expiry on the service's clock; the expiry loop (every 0.1 s here) acts on it.
    clock.advance(expires - clock.now + timedelta(seconds=1))
    path = f"/v1/requests/{request['id']}"

    async def expired() -> dict[str, Any] | None:
        found = await ok(await approval.get(path, headers=bearer(admin_key)))
        return found if found["status"] == "expired" else None

    found = await eventually(expired, what="the expiry loop to expire the request")
    assert found["decided_by"] == "steward-approval"
    assert datetime.fromisoformat(found["decided_at"]) == clock.now
    created = datetime.fromisoformat(request["created_at"])
    assert found["lead_time_seconds"] == (clock.now - created).total_seconds()
    assert found["overdue"] is False
    await wait_status(catalog, admin_key, "model", name, "1.0.0", "draft")
    assert await version_status(catalog, admin_key, "model", name, "1.0.0") == "draft"


async def test_access_to_part_of_an_mcp_server_is_granted_as_asked(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    team: dict[str, str],
) -> None:
    """A developer asks for a server's read-only tools only; once approved, that is what the
    project's entitlement covers. A model's access cannot be limited to tools."""
    project, dev = team["project"], team["dev"]
    name = uname("srv")
    await import_yaml(catalog, admin_key, catalog_yaml([], [mcp_server(name)]))
    await admitted(catalog, approval, admin_key, dev, project, "mcp_server", name)
    asked = {"asset_kind": "mcp_server", "asset_name": name, "tool_access": ["read_only"]}
    request = await file_request(approval, dev, project, "access", asked)
    assert request["payload"]["tool_access"] == ["read_only"]
    await approve(approval, admin_key, request["id"])

    async def granted() -> list[dict[str, Any]]:
        rows = await ok(
            await authz.get(f"/v1/projects/{project}/entitlements", headers=bearer(admin_key))
        )
        return [e for e in rows if e["asset_name"] == name]

    [grant] = await eventually(granted, what="the limited entitlement")
    assert (grant["tool_access"], grant["tools"]) == (["read_only"], None)

    model_name = await _draft(catalog, admin_key)
    await admitted(catalog, approval, admin_key, dev, project, "model", model_name)
    refused = await approval.post(
        f"/v1/projects/{project}/requests",
        json={
            "kind": "access",
            "payload": {"asset_kind": "model", "asset_name": model_name, "tools": ["search"]},
        },
        headers=bearer(dev),
    )
    assert refused.status_code == 422, refused.text
