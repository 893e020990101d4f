"""Requests: typed payloads, decisions and their rules, SLA clocks, queues and statistics."""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI

from libs.common.settings import Settings
from services.approval.config import ApprovalConfig
from tests.approval.support import (
    DEV_SCOPES,
    admitted,
    approve,
    catalog_yaml,
    eventually,
    file_request,
    import_yaml,
    model,
    uname,
    version_status,
    wait_status,
)
from tests.conftest import running
from tests.helpers import bearer, member_key, new_project, ok


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
    catalog: httpx.AsyncClient, approval: httpx.AsyncClient, admin_key: str, team: dict[str, str]
) -> None:
    project = team["project"]
    name = await _draft(catalog, admin_key)
    request = await file_request(approval, team["dev"], project, "asset", _asset(name))
    created = datetime.fromisoformat(request["created_at"])
    due = datetime.fromisoformat(request["due_at"])
    assert due - created == timedelta(days=5)
    assert request["overdue"] is False

    queue = await ok(
        await approval.get(
            "/v1/requests",
            params={"status": "pending", "project": project},
            headers=bearer(admin_key),
        )
    )
    assert [r["id"] for r in queue["items"]] == [request["id"]]
    overdue = await ok(
        await approval.get(
            "/v1/requests",
            params={"overdue": "true", "project": project},
            headers=bearer(admin_key),
        )
    )
    assert overdue["items"] == []
    stats = await ok(await approval.get("/v1/requests/stats", headers=bearer(admin_key)))
    assert stats["by_project"][project]["pending"] == 1


async def test_lead_time_statistics_give_median_and_p90_per_kind(
    approval: httpx.AsyncClient, admin_key: str, team: dict[str, str]
) -> None:
    for _ in range(3):
        request = await file_request(
            approval, team["dev"], team["project"], "quota", {"window": "hour", "token_limit": 10}
        )
        await approve(approval, admin_key, request["id"])
    stats = await ok(await approval.get("/v1/requests/stats", headers=bearer(admin_key)))
    quota = stats["by_kind"]["quota"]
    assert quota["approved"] >= 3
    assert 0 <= quota["lead_time_median_seconds"] <= quota["lead_time_p90_seconds"] < 60


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
    settings: Settings,
    authz_app: FastAPI,
    catalog_app: FastAPI,
    catalog: httpx.AsyncClient,
    admin_key: str,
    team: dict[str, str],
) -> None:
    from services.approval.app import create_app

    # An instance whose clock is minutes long: a request is due in ~1 s and expires ~1 s later.
    config = ApprovalConfig(
        sla_days=1 / 86400, expire_after_days=1 / 86400, expiry_poll_seconds=0.2
    )
    transports = {
        "authz": httpx.ASGITransport(app=authz_app),
        "catalog": httpx.ASGITransport(app=catalog_app),
    }
    app = create_app(settings, config=config, transports=transports)
    async for started in running(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=started), base_url="http://approval"
        ) as client:
            name = await _draft(catalog, admin_key)
            request = await file_request(
                client, team["dev"], team["project"], "asset", _asset(name)
            )
            await wait_status(catalog, admin_key, "model", name, "1.0.0", "submitted")

            path = f"/v1/requests/{request['id']}"

            async def expired(path: str = path) -> dict[str, object] | None:
                found = await ok(await client.get(path, headers=bearer(admin_key)))
                return found if found["status"] == "expired" else None

            found = await eventually(expired, what="the request to expire")
            assert found["decided_by"] == "steward-approval"
            assert found["overdue"] is False
            await wait_status(catalog, admin_key, "model", name, "1.0.0", "draft")
    assert await version_status(catalog, admin_key, "model", name, "1.0.0") == "draft"
