"""Auto-approve policies: declarative, audited, and never a way around a reviewer's judgement.

The approval service here runs on a clock the tests move (``clock``): good standing looks back
``lookback_days`` on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from fastapi import FastAPI

from libs.common.settings import Settings
from tests.approval.support import (
    DEV_SCOPES,
    Clock,
    admitted,
    catalog_yaml,
    clocked_approval,
    eventually,
    file_request,
    import_yaml,
    model,
    uname,
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


async def _general_model(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
) -> str:
    """An admitted model tagged ``general`` (admitted through a throwaway project)."""
    name = uname("general")
    await import_yaml(catalog, admin_key, catalog_yaml([model(name, tags=["general"])]))
    project = await new_project(authz, admin_key, "admit")
    dev = await member_key(authz, admin_key, project, "developer", DEV_SCOPES)
    await admitted(catalog, approval, admin_key, dev, project, "model", name)
    return name


async def test_access_to_a_general_asset_is_auto_approved_for_a_project_in_good_standing(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
    clock: Clock,
) -> None:
    name = await _general_model(authz, catalog, approval, admin_key)
    good, bad = await new_project(authz, admin_key, "good"), await new_project(authz, admin_key)
    good_dev = await member_key(authz, admin_key, good, "developer", DEV_SCOPES)
    bad_dev = await member_key(authz, admin_key, bad, "developer", DEV_SCOPES)
    policy = uname("general-access")
    rule = {
        "description": "general assets for projects in good standing",
        "kind": "access",
        "tags_any": ["general"],
        "projects": [good, bad],
        "lookback_days": 7,
    }
    created = await approval.put(f"/v1/policies/{policy}", json=rule, headers=bearer(admin_key))
    assert created.status_code == 201
    listed = await ok(await approval.get("/v1/policies", headers=bearer(good_dev)))
    assert policy in [p["name"] for p in listed]

    request = await file_request(
        approval, good_dev, good, "access", {"asset_kind": "model", "asset_name": name}
    )
    assert request["status"] == "approved"
    assert request["decided_by"] == f"policy:{policy}"
    assert request["policy"] == policy

    async def entitled() -> bool:
        rows = await ok(
            await authz.get(f"/v1/projects/{good}/entitlements", headers=bearer(admin_key))
        )
        return any(e["asset_name"] == name for e in rows)

    await eventually(entitled, what="the auto-approved entitlement")

    # A project with a recent rejection is not in good standing: a person decides.
    quota = await file_request(
        approval, bad_dev, bad, "quota", {"window": "day", "token_limit": 10**9}
    )
    await ok(
        await approval.post(
            f"/v1/requests/{quota['id']}/reject",
            json={"comment": "far too much"},
            headers=bearer(admin_key),
        )
    )
    pending = await file_request(
        approval, bad_dev, bad, "access", {"asset_kind": "model", "asset_name": name}
    )
    assert pending["status"] == "pending"

    # The policy and its decisions are in the audit log.
    async def audited() -> bool:
        page = await ok(
            await approval.get(
                "/v1/audit", params={"service": "approval", "limit": 500}, headers=bearer(admin_key)
            )
        )
        actions = {(r["action"], r["target"]) for r in page["items"]}
        return {
            ("policy.put", f"policy/{policy}"),
            ("request.auto_approve", f"request/{request['id']}"),
        } <= actions

    await eventually(audited, what="the policy and its decision in the audit log")

    # Once the rejection is older than lookback_days, the project is in good standing again.
    await ok(await approval.post(f"/v1/requests/{pending['id']}/withdraw", headers=bearer(bad_dev)))
    clock.advance(timedelta(days=7, seconds=1))
    again = await file_request(
        approval, bad_dev, bad, "access", {"asset_kind": "model", "asset_name": name}
    )
    assert again["status"] == "approved"
    assert again["decided_by"] == f"policy:{policy}"


async def test_a_policy_never_approves_a_request_of_its_own_author(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
) -> None:
    name = await _general_model(authz, catalog, approval, admin_key)
    project = await new_project(authz, admin_key)
    policy = uname("own")
    await ok(
        await approval.put(
            f"/v1/policies/{policy}",
            json={"kind": "access", "tags_any": ["general"], "projects": [project]},
            headers=bearer(admin_key),
        ),
        201,
    )
    request = await file_request(
        approval, admin_key, project, "access", {"asset_kind": "model", "asset_name": name}
    )
    assert request["status"] == "pending"
    await ok(await approval.delete(f"/v1/policies/{policy}", headers=bearer(admin_key)), 204)
    gone = await approval.delete(f"/v1/policies/{policy}", headers=bearer(admin_key))
    assert gone.status_code == 404


async def test_policies_are_validated_and_asset_requests_cannot_be_auto_approved(
    approval: httpx.AsyncClient, admin_key: str
) -> None:
    for rule, field in (
        ({"kind": "asset", "projects": ["a"]}, "kind"),
        ({"kind": "access"}, ""),
        ({"kind": "quota", "tags_any": ["general"]}, ""),
        ({"kind": "access", "tags_any": ["general"], "auto": True}, "auto"),
        ({"kind": "endpoint", "max_estimated_cost": -1}, "max_estimated_cost"),
    ):
        response = await approval.put(
            f"/v1/policies/{uname('p')}", json=rule, headers=bearer(admin_key)
        )
        assert response.status_code == 422, rule
        assert response.json()["errors"][0]["field"] == field, response.json()


async def test_endpoint_policy_caps_the_estimated_cost(
    authz: httpx.AsyncClient,
    catalog: httpx.AsyncClient,
    approval: httpx.AsyncClient,
    admin_key: str,
) -> None:
    name = await _general_model(authz, catalog, approval, admin_key)
    project = await new_project(authz, admin_key)
    dev = await member_key(authz, admin_key, project, "developer", DEV_SCOPES)
    await ok(
        await approval.put(
            f"/v1/policies/{uname('cheap')}",
            json={"kind": "endpoint", "max_estimated_cost": 50, "projects": [project]},
            headers=bearer(admin_key),
        ),
        201,
    )
    plan = {
        "gpus": 1,
        "replicas": 1,
        "hours": 8,
        "gpu_hour_rate": 2,
        "data_classification": "public",
        "network_exposure": "project",
    }
    cheap = await file_request(
        approval, dev, project, "endpoint", {"model_name": name, "version": "1.0.0", "plan": plan}
    )
    assert cheap["status"] == "approved"
    dear = await file_request(
        approval,
        dev,
        project,
        "endpoint",
        {"model_name": name, "version": "1.0.0", "plan": {**plan, "hours": 100}},
    )
    assert dear["status"] == "pending"
    assert dear["cost"]["estimated_cost"] == 200.0
